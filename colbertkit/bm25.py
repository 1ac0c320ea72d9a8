"""The lexical first stage of mining: text analysis per language and a BM25 index.

bm25s computes the index (Lucene's BM25: ``k1`` 1.5, ``b`` 0.75, ``idf = ln(1 + (N - df + 0.5) /
(df + 0.5))``, which is always positive). bm25s splits text with ``\\b\\w\\w+\\b``, which keeps a
whole run of Chinese characters as one word; this module supplies the analysis instead:

* every text is normalised with NFKC and casefolded;
* CJK characters (Han, kana, Hangul) become single characters and the bigrams of neighbouring
  characters, the usual unsegmented treatment of CJK text (Lucene's CJK analyser uses bigrams);
* other words (``\\w+`` runs) lose stop words and are stemmed with the Snowball stemmer of the
  language (PyStemmer) where the language has one.

Token ids are assigned while the corpus streams in and kept as one flat ``int32`` array, never as
Python lists of strings. Retrieval scores only the passages that share a term with the query and
ranks them by score, ties by corpus position, so a ranking never depends on anything but its
inputs. A passage that shares no term with the query is not retrieved.
"""

from __future__ import annotations

import array
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from colbertkit.errors import ColbertkitError, UsageError

# Han (with extension A and compatibility ideographs), hiragana, katakana, Hangul syllables, and
# the supplementary Han planes (extension B onwards).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0003134f"
_TOKEN = re.compile(f"([{_CJK}]+)|([^\\W{_CJK}]+)")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_WORD_CHAR = re.compile(r"\w")
_WORD = re.compile(r"\w+")

# The share of CJK characters among word characters above which ``auto`` picks ``cjk``.
CJK_SHARE_FOR_AUTO = 0.3
INSTALL_HINT = "pip install 'bm25s>=0.3,<0.4' 'PyStemmer>=2.2' (colbertkit's own dependencies)"


@dataclass(frozen=True)
class Language:
    """How words outside CJK runs are analysed."""

    code: str
    stemmer: str | None = None  # a PyStemmer (Snowball) algorithm
    stopwords: str | None = None  # the name of a stop-word list in bm25s.stopwords


# bm25s ships the stop-word lists (Lucene's for English, NLTK's for the others); PyStemmer the
# stemmers. CJK text is analysed the same way whatever the language (characters and bigrams);
# under cjk/zh/ja/ko, Latin words inside it are only casefolded.
LANGUAGES: dict[str, Language] = {
    language.code: language
    for language in (
        Language("en", "english", "STOPWORDS_EN"),
        Language("de", "german", "STOPWORDS_GERMAN"),
        Language("fr", "french", "STOPWORDS_FRENCH"),
        Language("es", "spanish", "STOPWORDS_SPANISH"),
        Language("pt", "portuguese", "STOPWORDS_PORTUGUESE"),
        Language("it", "italian", "STOPWORDS_ITALIAN"),
        Language("nl", "dutch", "STOPWORDS_DUTCH"),
        Language("ru", "russian", "STOPWORDS_RUSSIAN"),
        Language("sv", "swedish", "STOPWORDS_SWEDISH"),
        Language("no", "norwegian", "STOPWORDS_NORWEGIAN"),
        Language("da", "danish", "STOPWORDS_DANISH"),
        Language("tr", "turkish", "STOPWORDS_TURKISH"),
        Language("cjk"),
        Language("zh"),
        Language("ja"),
        Language("ko"),
        Language("none"),
    )
}
LANGUAGE_CHOICES = ("auto", *LANGUAGES)


def normalize(text: str) -> str:
    """NFKC, casefolded: the form that tokenisation and text comparison share."""
    return unicodedata.normalize("NFKC", text).casefold()


def collapse_whitespace(normalized: str) -> str:
    return " ".join(normalized.split())


def cjk_share(texts: Iterable[str]) -> float:
    """The share of CJK characters among the word characters of ``texts``."""
    cjk = words = 0
    for text in texts:
        cjk += len(_CJK_CHAR.findall(text))
        words += len(_WORD_CHAR.findall(text))
    return cjk / words if words else 0.0


def detect_language(sample: Iterable[str]) -> str:
    """``cjk`` if :data:`CJK_SHARE_FOR_AUTO` or more of the word characters are CJK, else ``en``."""
    return "cjk" if cjk_share(sample) >= CJK_SHARE_FOR_AUTO else "en"


def require_bm25s() -> Any:
    """Import bm25s, or say how to install it."""
    try:
        import bm25s
    except ImportError:
        raise UsageError(f"mining needs the bm25s package: {INSTALL_HINT}") from None
    return bm25s


class Analyzer:
    """Turns normalised texts into terms for one language; see the module doc.

    :meth:`term_ids` maps the terms to ids: with ``grow=True`` unseen terms join the vocabulary
    (the corpus), with ``grow=False`` they are dropped (a query term no passage has cannot match).
    """

    def __init__(self, language: str) -> None:
        if language not in LANGUAGES:
            raise UsageError(f"--language {language}: use one of {', '.join(LANGUAGE_CHOICES)}")
        self.language = LANGUAGES[language]
        self.vocabulary: dict[str, int] = {}
        # Surface word -> its term ("" for a stop word): each distinct word is stemmed once;
        # and -> its term id (-1 for a stop word), the fast path of term_ids.
        self._word_terms: dict[str, str] = {}
        self._word_ids: dict[str, int] = {}
        self._stem: Callable[[str], str] | None = None
        if self.language.stemmer is not None:
            try:
                import Stemmer
            except ImportError:
                raise UsageError(
                    f"--language {language} needs the PyStemmer package: {INSTALL_HINT}"
                ) from None
            self._stem = Stemmer.Stemmer(self.language.stemmer).stemWord
        if self.language.stopwords is not None:
            stopwords = getattr(require_bm25s().stopwords, self.language.stopwords)
            self._word_terms.update((normalize(word), "") for word in stopwords)

    @property
    def code(self) -> str:
        return self.language.code

    def _words(self, normalized: str) -> tuple[list[str], list[str]]:
        """(words outside CJK runs, CJK terms: characters then bigrams of each run)."""
        if normalized.isascii() or not _CJK_CHAR.search(normalized):
            return _WORD.findall(normalized), []  # the common case, three times faster
        words: list[str] = []
        cjk_terms: list[str] = []
        for cjk_run, word in _TOKEN.findall(normalized):
            if word:
                words.append(word)
            else:
                cjk_terms.extend(cjk_run)
                cjk_terms.extend(map(str.__add__, cjk_run[:-1], cjk_run[1:]))  # bigrams
        return words, cjk_terms

    def _word_term(self, word: str) -> str:
        term = self._word_terms.get(word)
        if term is None:
            term = self._word_terms[word] = self._stem(word) if self._stem else word
        return term

    def terms(self, normalized: str) -> list[str]:
        """The terms of a text already passed through :func:`normalize` (words, then CJK)."""
        words, cjk_terms = self._words(normalized)
        terms = [term for term in map(self._word_term, words) if term]
        return terms + cjk_terms

    def term_ids(self, normalized: str, grow: bool = True) -> list[int]:
        """Term ids of a normalised text; BM25 needs counts, not order."""
        words, cjk_terms = self._words(normalized)
        word_ids = self._word_ids
        ids = list(map(word_ids.get, words))
        if None in ids:
            ids = [
                self._word_id(word, grow) if i is None else i
                for i, word in zip(ids, words, strict=True)
            ]
        if cjk_terms:
            # C-level lookups first; only terms never seen before take the slow path.
            cjk_ids = list(map(self.vocabulary.get, cjk_terms))
            if None in cjk_ids:
                cjk_ids = [
                    (self._term_id(term) if grow else -1) if i is None else i
                    for i, term in zip(cjk_ids, cjk_terms, strict=True)
                ]
            ids.extend(cjk_ids)
        return [i for i in ids if i >= 0] if -1 in ids else ids

    def _term_id(self, term: str) -> int:
        term_id = self.vocabulary.get(term)
        if term_id is None:
            term_id = self.vocabulary[term] = len(self.vocabulary)
        return term_id

    def _word_id(self, word: str, grow: bool) -> int:
        """The term id of a word outside CJK runs (-1: a stop word, or unknown with grow off)."""
        term = self._word_term(word)
        if not term:
            term_id = -1
        elif grow:
            term_id = self._term_id(term)
        else:
            term_id = self.vocabulary.get(term, -1)
            if term_id < 0:
                return -1  # may become known later: not cached
        self._word_ids[word] = term_id
        return term_id


class _TermLists:
    """Each passage's term ids as a list, rebuilt on demand from one flat int32 array.

    bm25s's index builder walks the corpus three times (lengths, document frequencies, scores);
    Python lists of ints for a million passages would take gigabytes, this takes 4 bytes a term.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat = flat
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __iter__(self) -> Iterator[list[int]]:
        flat, offsets = self.flat, self.offsets
        for i in range(len(offsets) - 1):
            yield flat[offsets[i] : offsets[i + 1]].tolist()


class BM25Index:
    """A BM25 index of a corpus, built by bm25s from :class:`Analyzer` term ids."""

    def __init__(self, analyzer: Analyzer) -> None:
        self.analyzer = analyzer
        self._terms = array.array("i")
        self._offsets = array.array("q", [0])
        self._retriever: Any = None

    def add(self, normalized: str) -> None:
        """Add one passage (already :func:`normalize`-d) at the next position."""
        self._terms.extend(self.analyzer.term_ids(normalized, grow=True))
        self._offsets.append(len(self._terms))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def build(self) -> None:
        """Compute the BM25 weights; the term lists are dropped afterwards."""
        bm25s = require_bm25s()
        if len(self) == 0:
            raise ColbertkitError("the corpus has no passages")
        if not self._terms:
            raise ColbertkitError(
                "the corpus has no indexable words (every passage is empty, punctuation or "
                "stop words); check the corpus file and --language"
            )
        retriever = bm25s.BM25(method="lucene")
        term_lists = _TermLists(
            np.frombuffer(self._terms, dtype=np.int32), np.frombuffer(self._offsets, np.int64)
        )
        retriever.scores = retriever.build_index_from_ids(
            unique_token_ids=list(range(len(self.analyzer.vocabulary))),
            corpus_token_ids=term_lists,
            show_progress=False,
        )
        self._retriever = retriever
        del term_lists
        self._terms = array.array("i")
        self._offsets = array.array("q", [0] * 1)
        self.passages = int(retriever.scores["num_docs"])

    @property
    def index_bytes(self) -> int:
        scores = self._retriever.scores
        return sum(scores[key].nbytes for key in ("data", "indices", "indptr"))

    def search(self, query: str, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``depth`` passages for ``query``: (positions, scores), best first.

        Only passages sharing a term with the query are returned; equal scores are ordered by
        corpus position.
        """
        term_ids = self.analyzer.term_ids(normalize(query), grow=False)
        if not term_ids:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        scores = self._retriever.get_scores_from_ids(term_ids)  # (passages,) float32
        matched = np.flatnonzero(scores > 0)
        matched_scores = scores[matched]
        if len(matched) > depth:
            # Keep every passage tied with the depth-th best, then order them exactly.
            threshold = np.partition(matched_scores, len(matched) - depth)[len(matched) - depth]
            keep = matched_scores >= threshold
            matched, matched_scores = matched[keep], matched_scores[keep]
        order = np.lexsort((matched, -matched_scores))[:depth]
        return matched[order], matched_scores[order]
