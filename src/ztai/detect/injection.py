"""Prompt-injection detector: a hashed n-gram logistic model over normalised text, CPU only, no sklearn.

Pipeline for one text:

1. `normalize` undoes obfuscation (invisible characters, homoglyphs, encodings, markup) and reports it;
   each signal becomes a Finding(detector="obfuscation", type=<kind>).
2. The normalised text is lowercased, whitespace runs collapse to one space and digits fold to `0`.
   Features are hashed into 2**bits buckets: character 3/4/5-grams and word 1/2-grams, present/absent,
   L2-normalised per window. With `source_features`, every feature also has a copy specific to the source
   group (`user` for direct injection / jailbreaks, `data` for documents, tool and model output), so the
   same request can weigh differently when the user asks it and when it is hidden in a tool result.
3. Long texts are scored in overlapping windows (the model is trained on windows of the same size) and
   the maximum window logit is calibrated (Platt scaling fitted on held-out folds) into a probability.

The artifact (`models/injection.npz` + `models/injection.json`) is made by `scripts/train_injection.py`;
the hashing here is the one the training uses, so features cannot drift between the two.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ztai.detect.base import Finding, Source
from ztai.detect.normalize import SIGNAL_SCORES, NormalizedText, normalize

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

MODEL_DIR = Path(__file__).resolve().parent / "models"
MODEL_NAME = "injection"

GROUP_USER = 0
GROUP_DATA = 1
GROUPS = ("user", "data")


def source_group(source: str) -> int:
    """`user` prompts are direct injection/jailbreak territory; everything else is data (indirect)."""
    return GROUP_USER if source == "user" else GROUP_DATA


# ------------------------------------------------------------------------------------------- hashing

_P = 0x100000001B3  # odd, so invertible modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)
_MASK64 = (1 << 64) - 1
_powers_lock = threading.Lock()
_powers: tuple[U64, U64] = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))


def _power_tables(size: int) -> tuple[U64, U64]:
    """P**k and P**-k modulo 2**64 for k < size (grown on demand, shared)."""
    global _powers
    pw, inv = _powers
    if len(pw) >= size:
        return pw, inv
    with _powers_lock:
        pw, inv = _powers
        if len(pw) < size:
            new_size = max(size, 2 * len(pw), 4096)
            pw = np.full(new_size, _P, dtype=np.uint64)
            pw[0] = 1
            pw = np.cumprod(pw, dtype=np.uint64)
            inv = np.full(new_size, _P_INV, dtype=np.uint64)
            inv[0] = 1
            inv = np.cumprod(inv, dtype=np.uint64)
            _powers = (pw, inv)
    return pw, inv


def _mix(values: U64) -> U64:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _salt(name: str) -> np.uint64:
    value = 0xCBF29CE484222325
    for byte in name.encode():
        value = ((value ^ byte) * _P) & _MASK64
    return np.uint64(value)


_SALTS = {name: _salt(name) for name in ("c3", "c4", "c5", "c2", "c6", "w1", "w2", "user", "data")}


def _word_table() -> npt.NDArray[np.bool_]:
    """Which BMP code points are word characters (regex `\\w`), computed once at C speed."""
    chars = "".join(chr(code) if not 0xD800 <= code <= 0xDFFF else " " for code in range(0x10000))
    marked = re.sub(r"\w", "\x01", re.sub(r"[^\w]", "\x00", chars))
    return np.frombuffer(marked.encode("latin-1"), dtype=np.uint8).astype(bool)


_WORD_CHARS = _word_table()


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    bits: int = 18
    char_ngrams: tuple[int, ...] = (3, 4, 5)
    word_ngrams: tuple[int, ...] = (1, 2)
    window: int = 1024  # characters of normalised text per window
    stride: int = 512
    source_features: bool = True
    small_window: int = 0  # a second, finer scale of windows (stride: half of it); 0 = none

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "char_ngrams": list(self.char_ngrams),
            "word_ngrams": list(self.word_ngrams),
            "window": self.window,
            "stride": self.stride,
            "source_features": self.source_features,
            "small_window": self.small_window,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureConfig:
        return cls(
            bits=int(data["bits"]),
            char_ngrams=tuple(int(n) for n in data["char_ngrams"]),
            word_ngrams=tuple(int(n) for n in data["word_ngrams"]),
            window=int(data["window"]),
            stride=int(data["stride"]),
            source_features=bool(data["source_features"]),
            small_window=int(data.get("small_window", 0)),
        )


@dataclass(slots=True)
class Features:
    """Hashed n-gram occurrences of one text, in position order: bucket ids, start positions (in the
    normalised text) and lengths (in normalised characters, for explanations)."""

    ids: I64
    positions: I64
    lengths: I64

    def window(self, start: int, end: int) -> tuple[I64, I64, I64]:
        a = int(np.searchsorted(self.positions, start, side="left"))
        b = int(np.searchsorted(self.positions, end, side="left"))
        return self.ids[a:b], self.positions[a:b], self.lengths[a:b]


def _lower(text: str) -> str:
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)  # keep one char per char


def featurize(text: str, config: FeatureConfig) -> Features:
    """The hashed features of a normalised text (source-independent part; see `with_group`)."""
    empty = np.zeros(0, dtype=np.int64)
    if not text:
        return Features(empty, empty, empty)
    codes32 = np.frombuffer(_lower(text).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    # Collapse whitespace runs to one space; fold digits to "0".
    space = codes32 <= 32
    keep = np.ones(len(codes32), dtype=bool)
    keep[1:] = ~(space[1:] & space[:-1])
    where = np.flatnonzero(keep).astype(np.int64)
    codes = codes32[keep].astype(np.uint64)
    codes[space[keep]] = 32
    codes[(codes >= 48) & (codes <= 57)] = 48
    m = len(codes)
    pw, inv = _power_tables(m + 1)
    prefix = np.zeros(m + 1, dtype=np.uint64)
    np.cumsum(codes * pw[:m], dtype=np.uint64, out=prefix[1:])
    shift = np.uint64(64 - config.bits)
    id_parts: list[U64] = []
    pos_parts: list[I64] = []
    len_parts: list[I64] = []
    for n in config.char_ngrams:
        if m < n:
            continue
        grams = (prefix[n:] - prefix[:-n]) * inv[: m - n + 1]
        id_parts.append(_mix(grams ^ _SALTS[f"c{n}"]) >> shift)
        starts = where[: m - n + 1]
        pos_parts.append(starts)
        len_parts.append(where[n - 1 :] + 1 - starts)
    if config.word_ngrams:
        word = _WORD_CHARS[np.minimum(codes, 0xFFFF).astype(np.int64)] & (codes <= 0xFFFF)
        edges = np.diff(np.concatenate(([False], word, [False])).astype(np.int8))
        w_start = np.flatnonzero(edges == 1)
        w_end = np.flatnonzero(edges == -1)
        if len(w_start):
            word_hash = (prefix[w_end] - prefix[w_start]) * inv[w_start]
            if 1 in config.word_ngrams:
                id_parts.append(_mix(word_hash ^ _SALTS["w1"]) >> shift)
                pos_parts.append(where[w_start])
                len_parts.append(where[w_end - 1] + 1 - where[w_start])
            if 2 in config.word_ngrams and len(w_start) > 1:
                pair = _mix(word_hash[:-1] ^ _SALTS["w2"]) * np.uint64(_P) + word_hash[1:]
                id_parts.append(_mix(pair) >> shift)
                pos_parts.append(where[w_start[:-1]])
                len_parts.append(where[w_end[1:] - 1] + 1 - where[w_start[:-1]])
    if not id_parts:
        return Features(empty, empty, empty)
    ids = np.concatenate(id_parts).astype(np.int64)
    positions = np.concatenate(pos_parts)
    lengths = np.concatenate(len_parts)
    order = np.argsort(positions, kind="stable")
    return Features(ids[order], positions[order], lengths[order])


def with_group(ids: I64, group: int, config: FeatureConfig) -> I64:
    """Unique feature ids of a window: shared ids, plus their source-group copies when configured."""
    unique = np.unique(ids)
    if not config.source_features:
        return unique
    salt = _SALTS[GROUPS[group]]
    copies = (_mix(unique.astype(np.uint64) ^ salt) >> np.uint64(64 - config.bits)).astype(np.int64)
    return np.concatenate((unique, copies))


def _scale(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    if length <= window:
        return [(0, length)]
    stride = stride if length <= 64 * window else window
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return [(start, start + window) for start in starts]


def windows(length: int, config: FeatureConfig) -> list[tuple[int, int]]:
    """Overlapping windows covering the whole text, at one or two scales; the stride grows for very long
    texts so the number of windows stays near `length / window` (work stays linear)."""
    spans = _scale(length, config.window, config.stride)
    if config.small_window and length > config.small_window:
        spans.extend(_scale(length, config.small_window, config.small_window // 2))
    return spans


# --------------------------------------------------------------------------------------------- model

_ARANGE = np.arange(1 << 16, dtype=np.int32)
_local = threading.local()


def _stamp_array(bits: int) -> npt.NDArray[np.int32]:
    """A scratch array of 2**bits int32 per thread (its old contents never matter)."""
    stamp: npt.NDArray[np.int32] | None = getattr(_local, "stamp", None)
    if stamp is None or len(stamp) != 1 << bits:
        stamp = np.zeros(1 << bits, dtype=np.int32)
        _local.stamp = stamp
    return stamp


@dataclass
class InjectionModel:
    config: FeatureConfig
    weights: F32  # 2**bits
    bias: float
    group_bias: tuple[float, float]
    calibration: tuple[float, float]  # Platt: p = sigmoid(a * logit + b)
    threshold: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def window_logit(self, ids: I64, group: int) -> float:
        """The raw logit of one window: the same value as the training rows (`with_group`), computed
        without sorting: a per-thread stamp array marks one occurrence of every distinct id."""
        base = self.bias + self.group_bias[group]
        if len(ids) == 0:
            return base
        stamp = _stamp_array(self.config.bits)
        order = _ARANGE[: len(ids)] if len(ids) <= len(_ARANGE) else np.arange(len(ids), dtype=np.int32)
        stamp[ids] = order
        unique = ids[stamp[ids] == order]
        total = float(self.weights[unique].sum())
        count = len(unique)
        if self.config.source_features:
            salt = _SALTS[GROUPS[group]]
            copies = (_mix(unique.astype(np.uint64) ^ salt) >> np.uint64(64 - self.config.bits)).astype(
                np.int64
            )
            total += float(self.weights[copies].sum())
            count *= 2
        return base + total / math.sqrt(count)

    def probability(self, logit: float) -> float:
        a, b = self.calibration
        z = a * logit + b
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)

    def save(self, directory: Path, name: str = MODEL_NAME) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        npz_path = directory / f"{name}.npz"
        json_path = directory / f"{name}.json"
        np.savez_compressed(npz_path, weights=self.weights.astype(np.float16))
        meta = {
            "format": 1,
            "features": self.config.to_json(),
            "hash": "polynomial mod 2**64 (P=0x100000001B3) + splitmix64, see ztai.detect.injection",
            "bias": self.bias,
            "group_bias": list(self.group_bias),
            "calibration": {"method": "platt", "a": self.calibration[0], "b": self.calibration[1]},
            "threshold": self.threshold,
            **self.metadata,
        }
        json_path.write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")
        return npz_path, json_path

    @classmethod
    def load(cls, directory: Path = MODEL_DIR, name: str = MODEL_NAME) -> InjectionModel:
        meta = json.loads((directory / f"{name}.json").read_text())
        config = FeatureConfig.from_json(meta["features"])
        with np.load(directory / f"{name}.npz") as data:
            weights = np.asarray(data["weights"], dtype=np.float32)
        if weights.shape != (1 << config.bits,):
            raise ValueError(f"injection model weights have shape {weights.shape}, expected 2**{config.bits}")
        calibration = meta["calibration"]
        extra = {k: v for k, v in meta.items() if k not in _CORE_KEYS}
        return cls(
            config=config,
            weights=weights,
            bias=float(meta["bias"]),
            group_bias=(float(meta["group_bias"][0]), float(meta["group_bias"][1])),
            calibration=(float(calibration["a"]), float(calibration["b"])),
            threshold=float(meta["threshold"]),
            metadata=extra,
        )


_CORE_KEYS = frozenset({"format", "features", "hash", "bias", "group_bias", "calibration", "threshold"})
_default_model: InjectionModel | None = None
_default_lock = threading.Lock()


def default_model() -> InjectionModel:
    """The model shipped in the package (loaded once)."""
    global _default_model
    if _default_model is None:
        with _default_lock:
            if _default_model is None:
                _default_model = InjectionModel.load()
    return _default_model


# ------------------------------------------------------------------------------------------ detector


@dataclass(frozen=True, slots=True)
class Analysis:
    probability: float
    logit: float
    start: int  # span of the most suspicious window in the ORIGINAL text
    end: int
    cues: tuple[str, ...]  # the strongest n-grams of that window (normalised text)
    normalized: NormalizedText
    windows: tuple[tuple[int, int, float], ...] = ()  # every window: (start, end) normalised, logit

    def window_probabilities(self, model: InjectionModel) -> list[tuple[int, int, float]]:
        """Every window as (start, end, probability), spans in the ORIGINAL text."""
        if len(self.windows) == 1:
            return [(0, self.normalized.original_length, model.probability(self.windows[0][2]))]
        return [
            (*self.normalized.span_to_original(start, end), model.probability(logit))
            for start, end, logit in self.windows
        ]


def analyze(text: str, source: str, model: InjectionModel) -> Analysis:
    """Score a text: normalise, featurise once, score every window, keep the worst."""
    normalized = normalize(text)
    group = source_group(source)
    features = featurize(normalized.text, model.config)
    best_logit = -math.inf
    best = (0, len(normalized.text))
    spans = windows(len(normalized.text), model.config)
    scored: list[tuple[int, int, float]] = []
    for start, end in spans:
        ids = features.ids if len(spans) == 1 else features.window(start, end)[0]
        logit = model.window_logit(ids, group)
        scored.append((start, end, logit))
        if logit > best_logit:
            best_logit, best = logit, (start, end)
    orig_start, orig_end = normalized.span_to_original(*best)
    if len(spans) == 1:
        orig_start, orig_end = 0, len(text)
    return Analysis(
        probability=model.probability(best_logit),
        logit=best_logit,
        start=orig_start,
        end=orig_end,
        cues=(),
        normalized=normalized,
        windows=tuple(scored),
    )


def window_scores(text: str, source: str, model: InjectionModel) -> list[tuple[int, int, float]]:
    """Every scored window of `text` as (start, end, probability), spans in the ORIGINAL text. Used to
    find which parts of a long document look like instructions (value provenance in ztai.agents)."""
    return analyze(text, source, model).window_probabilities(model)


_STOP_TEXT = (
    "the a an and or to of in on at for with from by is are was be this that it its as com www http https "
    "org net html you your i me my we our he she they"
)
_STOP_WORDS = frozenset(_STOP_TEXT.split())


def explain(analysis: Analysis, source: str, model: InjectionModel, limit: int = 3) -> tuple[str, ...]:
    """The word n-grams of the worst window that pushed the score up most (for the evidence)."""
    normalized = analysis.normalized
    start = normalized.to_normalized(analysis.start)
    end = max(start, normalized.to_normalized(analysis.end))
    window_text = (
        normalized.text[start:end] if analysis.end < normalized.original_length else normalized.text[start:]
    )
    words_only = FeatureConfig(
        bits=model.config.bits,
        char_ngrams=(),
        word_ngrams=model.config.word_ngrams,
        window=model.config.window,
    )
    features = featurize(window_text, words_only)
    group = source_group(source)
    if len(features.ids) == 0:
        return ()
    weights = model.weights[features.ids]
    if model.config.source_features:
        copies = (
            _mix(features.ids.astype(np.uint64) ^ _SALTS[GROUPS[group]]) >> np.uint64(64 - model.config.bits)
        ).astype(np.int64)
        weights = weights + model.weights[copies]
    order = np.argsort(-weights, kind="stable")
    cues: list[str] = []
    lowered = window_text.lower()
    for index in order[:200]:
        if weights[index] <= 0 or len(cues) >= limit:
            break
        position, length = int(features.positions[index]), int(features.lengths[index])
        cue = " ".join(lowered[position : position + length].split())
        if len(cue) < 3 or all(word in _STOP_WORDS for word in cue.split()):
            continue
        if any(cue in seen or seen in cue for seen in cues):
            continue
        cues.append(cue[:30])
    return tuple(cues)


class InjectionDetector:
    """`scan(text, source)`: a `prompt_injection` finding when the calibrated probability reaches the
    threshold, plus one `obfuscation` finding per obfuscation signal. `score(text, source)` is the
    calibrated probability itself (for `context.content.injection_score`)."""

    name = "injection"

    def __init__(self, model: InjectionModel | None = None, threshold: float | None = None) -> None:
        self.model = model if model is not None else default_model()
        self.threshold = float(threshold) if threshold is not None else self.model.threshold
        self._last: tuple[str, int, Analysis] | None = None  # scan() then score() on one text: one pass

    def analyze(self, text: str, source: Source | str) -> Analysis:
        group = source_group(source)
        last = self._last
        if last is not None and last[1] == group and last[0] is text:
            return last[2]
        try:
            result = analyze(text, source, self.model)
        except (MemoryError, RecursionError):
            raise
        except Exception:
            result = Analysis(1.0, math.inf, 0, len(text), ("detector error",), normalize(""))
        self._last = (text, group, result)
        return result

    def score(self, text: str, source: Source | str) -> float:
        return self.analyze(text, source).probability

    def scan(self, text: str, source: Source) -> list[Finding]:
        analysis = self.analyze(text, source)
        findings: list[Finding] = []
        if analysis.probability >= self.threshold:
            cues = analysis.cues or explain(analysis, source, self.model)
            kinds = analysis.normalized.kinds
            evidence = f"p={analysis.probability:.2f} source={GROUPS[source_group(source)]}"
            if cues:
                evidence += " cues: " + ", ".join(repr(cue) for cue in cues)
            if kinds:
                evidence += " after decoding: " + ",".join(kinds)
            findings.append(
                Finding(
                    detector="injection",
                    type="prompt_injection",
                    start=analysis.start,
                    end=analysis.end,
                    score=analysis.probability,
                    evidence=evidence[:200],
                )
            )
        counts = analysis.normalized.counts
        for signal in analysis.normalized.signals:
            evidence = f"{signal.kind} x{counts.get(signal.kind, 1)}"
            if signal.detail:
                evidence += f": {signal.detail}"
            findings.append(
                Finding(
                    detector="obfuscation",
                    type=signal.kind,
                    start=signal.start,
                    end=signal.end,
                    score=SIGNAL_SCORES.get(signal.kind, 0.5),
                    evidence=evidence[:200],
                )
            )
        return findings


__all__ = [
    "Analysis",
    "FeatureConfig",
    "Features",
    "InjectionDetector",
    "InjectionModel",
    "analyze",
    "default_model",
    "featurize",
    "source_group",
    "window_scores",
    "windows",
    "with_group",
]
