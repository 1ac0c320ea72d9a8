"""The ``colbertkit`` command: parses arguments, calls the core library, renders results."""
