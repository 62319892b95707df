"""Prompt-injection detector: static sentence-encoder embeddings and a small neural head, CPU only.

Pipeline for one text:

1. `normalize` undoes obfuscation (invisible characters, homoglyphs, encodings, markup) and reports it;
   each signal becomes a Finding(detector="obfuscation", type=<kind>).
2. The normalised text is tokenised with the WordPiece tokenizer of all-MiniLM-L6-v2 and cut into
   overlapping windows of 256 tokens (stride 128). Each window becomes [unit mean | max | length] of its
   tokens' static embeddings (`ztai.detect.encoder`: distilled from the sentence encoder, so words that
   mean the same land near each other: "disregard the above" near "ignore previous instructions").
3. A one-hidden-layer network (numpy) scores each window, with the source group as an input (`user` for
   direct injection / jailbreaks, `data` for documents, tool and model output: the same request weighs
   differently when the user asks it and when it is hidden in a tool result). The maximum window logit is
   calibrated (Platt scaling on held-apart scores) into a probability.
4. Two thresholds, both chosen on benign texts the model did not see: `threshold` (flag; about 1% of
   benign texts reach it) and `refuse_threshold` (confident; about 0.1%).

The artifact (`models/injection.npz` + `models/injection.json`, next to the encoder files) is made by
`scripts/train_injection.py` with the run-time feature code here, so features cannot drift.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ztai.detect.base import Finding, Source
from ztai.detect.encoder import StaticEncoder, Tokens, token_windows
from ztai.detect.normalize import SIGNAL_SCORES, NormalizedText, normalize

F32 = npt.NDArray[np.float32]

MODEL_DIR = Path(__file__).resolve().parent / "models"
MODEL_NAME = "injection"

GROUP_USER = 0
GROUP_DATA = 1
GROUPS = ("user", "data")


def source_group(source: str) -> int:
    """`user` prompts are direct injection/jailbreak territory; everything else is data (indirect)."""
    return GROUP_USER if source == "user" else GROUP_DATA


# --------------------------------------------------------------------------------------------- head


@dataclass
class Head:
    """The classifier over one window: inputs z = ([features | features * is_user | group one-hot] - mean)
    / std (the product lets every feature weigh differently for a user prompt and for data); logit =
    w2 . z + b2 (linear: `w1` has no columns) or w2 . relu(W1 z + b1) + b2 (one hidden layer)."""

    mean: F32
    std: F32
    w1: F32  # inputs x hidden (inputs x 0: linear)
    b1: F32
    w2: F32  # hidden (or inputs)
    b2: float

    @property
    def linear(self) -> bool:
        return bool(self.w1.shape[1] == 0)

    @staticmethod
    def raw_inputs(features: F32, group: int) -> F32:
        rows = np.atleast_2d(features)
        onehot = np.zeros((len(rows), len(GROUPS)), dtype=np.float32)
        onehot[:, group] = 1.0
        user = rows if group == GROUP_USER else np.zeros_like(rows)
        return np.asarray(np.hstack((rows, user, onehot)), dtype=np.float32)

    def inputs(self, features: F32, group: int) -> F32:
        return np.asarray((self.raw_inputs(features, group) - self.mean) / self.std, dtype=np.float32)

    def logits(self, features: F32, group: int) -> F32:
        z = self.inputs(features, group)
        if self.linear:
            return np.asarray(z @ self.w2 + self.b2, dtype=np.float32)
        hidden = np.maximum(z @ self.w1 + self.b1, 0.0)
        return np.asarray(hidden @ self.w2 + self.b2, dtype=np.float32)

    def input_gradient(self, features: F32, group: int) -> F32:
        """d logit / d features for one window (for cues: gradient x input)."""
        if self.linear:
            grad = self.w2
        else:
            z = self.inputs(features, group)[0]
            active = (z @ self.w1 + self.b1) > 0
            grad = self.w1[:, active] @ self.w2[active]
        grad = grad / self.std
        n = len(features)
        out = grad[:n] + (grad[n : 2 * n] if group == GROUP_USER else 0.0)
        return np.asarray(out, dtype=np.float32)


@dataclass
class InjectionModel:
    encoder: StaticEncoder
    head: Head
    calibration: tuple[float, float]  # Platt: p = sigmoid(a * logit + b)
    threshold: float  # flag
    refuse_threshold: float  # confident: refuse a user prompt
    metadata: dict[str, Any] = field(default_factory=dict)

    def window_logits(self, tokens: Tokens, group: int) -> list[tuple[int, int, float]]:
        """(first token, end token, logit) of every window."""
        spans = token_windows(len(tokens))
        features = np.stack([self.encoder.features(tokens.ids[a:b]) for a, b in spans])
        logits = self.head.logits(features, group)
        return [(a, b, float(logit)) for (a, b), logit in zip(spans, logits, strict=True)]

    def probability(self, logit: float) -> float:
        a, b = self.calibration
        z = a * logit + b
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)

    def save(self, directory: Path, name: str = MODEL_NAME) -> tuple[Path, Path]:
        """The head and thresholds (the encoder files are written by scripts/distill_encoder.py)."""
        directory.mkdir(parents=True, exist_ok=True)
        npz_path = directory / f"{name}.npz"
        json_path = directory / f"{name}.json"
        head = self.head
        np.savez_compressed(
            npz_path,
            mean=head.mean.astype(np.float32),
            std=head.std.astype(np.float32),
            w1=head.w1.astype(np.float32),
            b1=head.b1.astype(np.float32),
            w2=head.w2.astype(np.float32),
            b2=np.asarray([head.b2], dtype=np.float32),
        )
        meta = {
            "format": 2,
            "encoder": "encoder",
            "calibration": {"method": "platt", "a": self.calibration[0], "b": self.calibration[1]},
            "threshold": self.threshold,
            "refuse_threshold": self.refuse_threshold,
            **self.metadata,
        }
        json_path.write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")
        return npz_path, json_path

    @classmethod
    def load(
        cls, directory: Path = MODEL_DIR, name: str = MODEL_NAME, encoder: StaticEncoder | None = None
    ) -> InjectionModel:
        meta = json.loads((directory / f"{name}.json").read_text())
        if meta.get("format") != 2:
            raise ValueError(
                f"injection model {directory / name} has format {meta.get('format')}, expected 2"
            )
        if encoder is None:
            # A head trained elsewhere (`train_injection.py --out DIR`) uses the packaged encoder.
            encoder_name = str(meta.get("encoder", "encoder"))
            home = directory if (directory / f"{encoder_name}.npz").exists() else MODEL_DIR
            encoder = _shared_encoder(home, encoder_name)
        with np.load(directory / f"{name}.npz") as data:
            arrays = {key: np.asarray(data[key], dtype=np.float32) for key in data.files}
        head = Head(
            arrays["mean"], arrays["std"], arrays["w1"], arrays["b1"], arrays["w2"], float(arrays["b2"][0])
        )
        if len(head.mean) != 2 * encoder.feature_size + len(GROUPS):
            raise ValueError(
                f"injection head expects {len(head.mean)} inputs, encoder gives {encoder.feature_size}"
            )
        calibration = meta["calibration"]
        threshold = float(meta["threshold"])
        extra = {k: v for k, v in meta.items() if k not in _CORE_KEYS}
        return cls(
            encoder=encoder,
            head=head,
            calibration=(float(calibration["a"]), float(calibration["b"])),
            threshold=threshold,
            refuse_threshold=max(threshold, float(meta.get("refuse_threshold", threshold))),
            metadata=extra,
        )


_CORE_KEYS = frozenset({"format", "encoder", "calibration", "threshold", "refuse_threshold"})
_encoders: dict[tuple[str, str], StaticEncoder] = {}
_default_model: InjectionModel | None = None
_default_lock = threading.Lock()


def _shared_encoder(directory: Path, name: str) -> StaticEncoder:
    """One encoder per file in the process (models trained on it share the matrix)."""
    key = (str(directory.resolve()), name)
    with _default_lock:
        if key not in _encoders:
            _encoders[key] = StaticEncoder.load(directory, name)
        return _encoders[key]


def default_model() -> InjectionModel:
    """The model shipped in the package (loaded once)."""
    global _default_model
    if _default_model is None:
        model = InjectionModel.load()
        with _default_lock:
            if _default_model is None:
                _default_model = model
    return _default_model


# ------------------------------------------------------------------------------------------ detector


@dataclass(frozen=True, slots=True)
class Analysis:
    probability: float
    logit: float
    start: int  # span of the most suspicious window in the ORIGINAL text
    end: int
    cues: tuple[str, ...]  # filled by `explain` (only for texts that are flagged)
    normalized: NormalizedText
    windows: tuple[tuple[int, int, float], ...] = ()  # every window: (start, end) normalised, logit
    tokens: Tokens | None = None
    best: tuple[int, int] = (0, 0)  # token span of the worst window

    def window_probabilities(self, model: InjectionModel) -> list[tuple[int, int, float]]:
        """Every window as (start, end, probability), spans in the ORIGINAL text."""
        if len(self.windows) <= 1:
            logit = self.windows[0][2] if self.windows else self.logit
            return [(0, self.normalized.original_length, model.probability(logit))]
        return [
            (*self.normalized.span_to_original(start, end), model.probability(logit))
            for start, end, logit in self.windows
        ]


def analyze(text: str, source: str, model: InjectionModel) -> Analysis:
    """Score a text: normalise, tokenise once, score every window, keep the worst."""
    normalized = normalize(text)
    group = source_group(source)
    tokens = model.encoder.tokenize(normalized.text)
    scored = model.window_logits(tokens, group)
    spans: list[tuple[int, int, float]] = []
    for a, b, logit in scored:
        if len(tokens) == 0:
            spans.append((0, len(normalized.text), logit))
        else:
            spans.append((int(tokens.starts[a]), int(tokens.ends[b - 1]), logit))
    worst = max(range(len(scored)), key=lambda i: scored[i][2])
    best_logit = scored[worst][2]
    if len(spans) == 1:
        orig_start, orig_end = 0, len(text)
    else:
        orig_start, orig_end = normalized.span_to_original(spans[worst][0], spans[worst][1])
    return Analysis(
        probability=model.probability(best_logit),
        logit=best_logit,
        start=orig_start,
        end=orig_end,
        cues=(),
        normalized=normalized,
        windows=tuple(spans),
        tokens=tokens,
        best=(scored[worst][0], scored[worst][1]),
    )


def window_scores(text: str, source: str, model: InjectionModel) -> list[tuple[int, int, float]]:
    """Every scored window of `text` as (start, end, probability), spans in the ORIGINAL text. Used to
    find which parts of a long document look like instructions (value provenance in ztai.agents)."""
    return analyze(text, source, model).window_probabilities(model)


def explain(analysis: Analysis, source: str, model: InjectionModel, limit: int = 3) -> tuple[str, ...]:
    """The words of the worst window that pushed the score up most (gradient x input on the mean)."""
    tokens = analysis.tokens
    if tokens is None or len(tokens) == 0:
        return ()
    a, b = analysis.best
    ids = tokens.ids[a:b]
    encoder = model.encoder
    gradient = model.head.input_gradient(encoder.features(ids), source_group(source))
    vectors = encoder.embeddings[ids]
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean)) or 1.0
    contribution = vectors @ gradient[: encoder.dims] / (norm * len(ids))
    text = analysis.normalized.text
    words: dict[tuple[int, int], float] = {}
    word_start = int(tokens.starts[a])
    for index in range(len(ids)):
        start, end = int(tokens.starts[a + index]), int(tokens.ends[a + index])
        if index == 0 or start > int(tokens.ends[a + index - 1]) or not text[start:end].isalnum():
            word_start = start
        span = (word_start, end)
        previous = words.pop((word_start, int(tokens.ends[a + index - 1])), 0.0) if index else 0.0
        words[span] = previous + float(contribution[index])
    ranked = sorted(words.items(), key=lambda item: -item[1])
    cues: list[str] = []
    for (start, end), value in ranked:
        if value <= 0 or len(cues) >= limit:
            break
        cue = text[start:end].lower()
        if len(cue) >= 3 and cue not in cues:
            cues.append(cue[:30])
    return tuple(cues)


class InjectionDetector:
    """`scan(text, source)`: a `prompt_injection` finding when the calibrated probability reaches the
    threshold, plus one `obfuscation` finding per obfuscation signal. `score(text, source)` is the
    calibrated probability itself (for `context.content.injection_score`); `confident(...)` says whether
    it reaches the refuse threshold (about 0.1% false positives)."""

    name = "injection"

    def __init__(
        self,
        model: InjectionModel | None = None,
        threshold: float | None = None,
        refuse_threshold: float | None = None,
    ) -> None:
        self.model = model if model is not None else default_model()
        self.threshold = float(threshold) if threshold is not None else self.model.threshold
        refuse = float(refuse_threshold) if refuse_threshold is not None else self.model.refuse_threshold
        self.refuse_threshold = max(self.threshold, refuse)
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

    def confident(self, text: str, source: Source | str) -> bool:
        return self.score(text, source) >= self.refuse_threshold

    def scan(self, text: str, source: Source) -> list[Finding]:
        analysis = self.analyze(text, source)
        findings: list[Finding] = []
        if analysis.probability >= self.threshold:
            cues = analysis.cues or explain(analysis, source, self.model)
            kinds = analysis.normalized.kinds
            confident = analysis.probability >= self.refuse_threshold
            level = "confident" if confident else "flagged"
            evidence = f"p={analysis.probability:.2f} {level} source={GROUPS[source_group(source)]}"
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
                    confident=confident,
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
    "Head",
    "InjectionDetector",
    "InjectionModel",
    "analyze",
    "default_model",
    "explain",
    "source_group",
    "window_scores",
]
