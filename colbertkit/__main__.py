from colbertkit.cli.app import main

main()
