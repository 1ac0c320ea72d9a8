"""Defaults that several parts of colbertkit share, written once.

Light on purpose (no torch): the CLI's option declarations import it.
"""

from __future__ import annotations

# Token lengths, CLS and SEP included (the reference's defaults).
QUERY_MAX_LEN = 128
PASSAGE_MAX_LEN = 512
# Size of a fresh ColBERT head (ColBERTv2's dimension).
FRESH_COLBERT_DIM = 128
# Texts per encoder forward when scoring or evaluating.
ENCODE_BATCH_SIZE = 32
# Pairs whose distinct texts are encoded together when scoring (the unit split across processes).
SCORE_WINDOW = 4096
