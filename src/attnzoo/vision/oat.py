"""OAT: Object-level Attention Transformer for gaze scanpath prediction in visual search.

Fang, Yu, Chen, Tong, Teoh, Wong, Huang. ECCV 2024. https://arxiv.org/abs/2407.13335
Official code: https://github.com/HKUST-NISL/oat_eccv24 (src/model/models.py ``Seq2SeqTransformer``,
``CNNEmbedding``, ``Cross_Attention``, ``PositionalEncoding``; src/model/positionalEncoding.py
``calculate3DPositional_learned``; src/model/positionalEncodingLearned.py; src/model/transformerLightning.py
``TransformerModel`` (init, ``processData3d``, ``train_batch_teacher_forcing``, ``test_max``,
``test_expect``); src/dataBuilders/data_builder.py ``Collator_pure``; src/preprocess/img_feature_amazon.py).
The repository has no licence: nothing of it is copied here (the position tables we ship are our
own, made by the published procedure, see :func:`make_position_table`).

A display holds ``N = rows * cols`` objects on a shelf grid (Amazon covers 6x14, yogurt 3x9,
wine 2x11), object ``i`` at ``(i // cols, i % cols)``. Pointer vocabulary, for N objects:

=========  ====================================================================
0 .. N-1   the objects, in reading order
N          EOS, which is also the encoder's *target token*: pointing at it ends the scanpath
N + 1      PAD (a constant logit slot; never predicted)
N + 2      BOS (decoder input only)
=========  ====================================================================

* **Tokens** are ``cat(appearance, position)``, ``emb_size/2`` each. Appearance: a small CNN from
  scratch on ``150 x 93`` **BGR 0-255 float** crops (:func:`crop_objects`). Position: the fixed
  learned table ``pe`` (+4 zero rows) indexed by ``(row, col, is_target)``:
  ``cat(pe[row], pe[col], pe[is_target])[:emb_size/2]``. It is not a parameter and not in the
  state dict (a non-persistent buffer).
* **Encoder** input: the N crops plus the target's crop last (``is_target = 1``); no 1-D PE.
* **Decoder** input: ``BOS`` (an all-ones "blank" image at the grid centre ``(rows/2, cols/2)``,
  truncated to ints) then the fixated objects, plus a sinusoidal 1-D PE with dropout; causal.
  ``is_target`` is 1 for every input equal to the target object.
* ``nn.TransformerEncoder``/``Decoder``: sequence-first, post-norm, ReLU (4 + 4 layers, d 512,
  4 heads, FFN 512, dropout 0.1).
* **Pointer head** (official ``CA_version 3``): ``CA_head`` bilinear heads
  ``(W_e enc)^T (W_d dec) / sqrt(CA_d_k)`` over the N+1 encoder tokens plus a constant-0 PAD
  slot, fused by ``readout = Linear(CA_head, 1)``: logits ``[T, B, N + 2]``.

Training (:func:`collate_oat`, :func:`teacher_forced_loss`): teacher forcing, cross-entropy
ignoring PAD, all-ones blanks for BOS/EOS/PAD images. Decoding (:func:`generate`, official
``test_max``/``test_expect``): step 1 may only point at objects, later steps at objects or EOS;
at most ``max_len`` steps; the predicted EOS ends the scanpath. **Test-time blanks are zeros**
(the official ``new_src_img``) while training used ones: we reproduce that inconsistency (it only
matters for what follows a predicted EOS, which :func:`greedy_eval` scores as the official code
does; :func:`generate` stops there). The BOS image stays all-ones in both.

Parameter names are the official ones (``model.`` stripped from the Lightning checkpoint, see
:func:`checkpoint_filter_fn`), including the unused ``generator`` and ``LinearEmbedding`` layers.
**No trained OAT weights are published**: ``create_model("oat_amazon")`` gives the official
initialisation; train it, or pass ``weights=PATH`` to a checkpoint of your own.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.errors import InvalidInputError, WeightsError
from attnzoo.factory import register_model
from attnzoo.vision._common import as_generator

__all__ = [
    "CROP_SIZE",
    "OAT",
    "POSITION_TABLES",
    "OATBatch",
    "OATGreedyEval",
    "OATSample",
    "OATScanpath",
    "checkpoint_filter_fn",
    "collate_oat",
    "crop_objects",
    "default_cfgs",
    "display_crops",
    "generate",
    "greedy_eval",
    "load_position_table",
    "make_position_table",
    "oat_amazon",
    "oat_loss",
    "oat_wine",
    "oat_yogurt",
    "teacher_forced_loss",
]

CROP_SIZE = (150, 93)  # (H, W) of every object crop: the official cv2.resize(crop, (93, 150))
PE_COLUMNS = 86  # width of the learned position table
_EXTRA_PE_ROWS = 4  # zero rows the official model appends to the table
_N_BLANKS = 4  # blank images after the N crops: EOS, PAD, BOS and one unused
_CNN_FEATURES = 1440  # 32 channels x 9 x 5 after the CNN on a 150 x 93 crop


# -- position tables -----------------------------------------------------------------------

@dataclass(frozen=True)
class PositionTableSpec:
    """How one shipped table was made by :func:`make_position_table`."""

    rows: int
    sigma: float
    seed: int
    iterations: int
    file: str


# The official tables are the authors' files (amazon_learned_random_PE.npy [14, 86] sigma 2,
# learned_PE_random_2.5.npy / _2.npy [11, 86] for yogurt / wine); ours re-run their procedure.
POSITION_TABLES: dict[str, PositionTableSpec] = {
    "amazon": PositionTableSpec(14, 2.0, 0, 10000, "oat_pe_amazon.npy"),
    "yogurt": PositionTableSpec(11, 2.5, 0, 10000, "oat_pe_yogurt.npy"),
    "wine": PositionTableSpec(11, 2.0, 0, 10000, "oat_pe_wine.npy"),
}


def make_position_table(n: int, sigma: float, seed: int = 0, iterations: int = 10000, *, columns: int = PE_COLUMNS,
                        lr: float = 0.01) -> np.ndarray:
    """A learned distance-based position table ``[n, columns]`` float32, as ``positionalEncodingLearned.py``.

    Adam (``lr``) on ``W ~ randn(n, columns)`` (drawn from ``torch.Generator().manual_seed(seed)``)
    minimises ``(sum_ij (cos(W_i, W_j) - exp(-(i - j)^2 / (2 sigma^2)))^2 + mean_i (|W_i| - mean|W|)^2)
    / (n (n - 1))`` for ``iterations`` steps, so that nearby rows/columns of the shelf get similar
    codes and every row has the same norm. The rows are returned unnormalised, as the official
    script saves them. Runs on one CPU thread (tiny ops: threads only cost time, and the result
    then does not depend on the thread count); deterministic for a given seed.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise InvalidInputError(f"n (table rows) must be an int >= 2, got {n!r}")
    if not sigma > 0 or not math.isfinite(sigma):
        raise InvalidInputError(f"sigma must be a positive number, got {sigma!r}")
    if iterations < 0 or columns < 1:
        raise InvalidInputError(f"iterations must be >= 0 and columns >= 1, got {iterations} and {columns}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_position_table(n, float(sigma), int(seed), int(iterations), int(columns), float(lr))
    finally:
        torch.set_num_threads(threads)


def _fit_position_table(n: int, sigma: float, seed: int, iterations: int, columns: int, lr: float) -> np.ndarray:
    with torch.enable_grad():
        weights = torch.randn(n, columns, generator=torch.Generator().manual_seed(int(seed))).requires_grad_(True)
        optimizer = torch.optim.Adam([weights], lr=lr)
        idx = torch.arange(n, dtype=torch.float32)
        target = torch.exp(-((idx[:, None] - idx[None, :]) ** 2) / (2 * float(sigma) ** 2))
        for _ in range(int(iterations)):
            optimizer.zero_grad()
            unit = F.normalize(weights, p=2, dim=1)
            norms = weights.norm(p=2, dim=1)
            loss = ((unit @ unit.T - target) ** 2).sum() + ((norms - norms.mean()) ** 2).mean()
            (loss / (n * (n - 1))).backward()
            optimizer.step()
    return weights.detach().numpy().astype(np.float32)


def load_position_table(table: str | os.PathLike | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A position table as float32 ``[R, C]``: a shipped name (``"amazon"``, ``"yogurt"``,
    ``"wine"``), a ``.npy`` path (e.g. the authors' ``amazon_learned_random_PE.npy``) or an array."""
    if isinstance(table, str) and table in POSITION_TABLES:
        data = resources.files(__package__).joinpath("data", POSITION_TABLES[table].file).read_bytes()
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    elif isinstance(table, (str, os.PathLike)):
        try:
            arr = np.load(os.fspath(table), allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InvalidInputError(f"cannot read the position table {os.fspath(table)!r} ({err}); pass a .npy file of a "
                                    f"[rows, columns] float array or one of {sorted(POSITION_TABLES)}") from None
    elif isinstance(table, torch.Tensor):
        arr = table.detach().cpu().numpy()
    elif isinstance(table, np.ndarray):
        arr = table
    else:
        raise InvalidInputError(f"pe_table must be a name ({', '.join(sorted(POSITION_TABLES))}), a .npy path or an array, "
                                f"got {type(table).__name__}")
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind not in "fiu" or 0 in arr.shape:
        raise InvalidInputError(f"a position table is a non-empty 2-D numeric array [rows, columns], got "
                                f"{getattr(arr, 'shape', None)} {getattr(arr, 'dtype', type(arr).__name__)}")
    if not np.isfinite(arr).all():
        raise InvalidInputError("the position table holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).clone()


# -- building blocks -----------------------------------------------------------------------

class CNNEmbedding(nn.Module):
    """Appearance of ``150 x 93`` crops: Conv5-ReLU-MaxPool5, Conv3-ReLU-MaxPool3, Linear(1440, out)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.cnn1 = nn.Sequential(nn.Conv2d(3, 16, (5, 5)), nn.ReLU(), nn.MaxPool2d(5))
        # The official constructor builds cnn2 twice (the SPP variant, then the default); the first
        # one only draws random numbers, which a seeded initialisation must draw as well.
        nn.Conv2d(16, 32, (3, 3))
        self.cnn2 = nn.Sequential(nn.Conv2d(16, 32, (3, 3)), nn.ReLU(), nn.MaxPool2d(3))
        self.fc = nn.Linear(_CNN_FEATURES, out_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, L, 150, 93, 3]`` BGR 0-255 -> ``[B, L, out]``."""
        b, length, h, w = images.shape[:4]
        # a channels-last view, not a copy, as the official code (the conv kernels it picks depend on it)
        x = images.contiguous().view(-1, h, w, 3).permute(0, 3, 1, 2)
        x = torch.flatten(self.cnn2(self.cnn1(x)), start_dim=1)
        return self.fc(x).view(b, length, -1)


class PositionalEncoding(nn.Module):
    """Sinusoidal 1-D position code ``[maxlen, 1, emb]`` added to the decoder input, then dropout."""

    def __init__(self, emb_size: int, dropout: float, maxlen: int = 5000):
        super().__init__()
        den = torch.exp(-torch.arange(0, emb_size, 2) * math.log(10000) / emb_size)
        pos = torch.arange(0, maxlen).reshape(maxlen, 1)
        table = torch.zeros((maxlen, emb_size))
        table[:, 0::2] = torch.sin(pos * den)
        table[:, 1::2] = torch.cos(pos * den)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pos_embedding", table.unsqueeze(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pos_embedding[: x.size(0), :])


class CrossAttention(nn.Module):
    """One pointer head: ``enc_fc(memory) . dec_fc(decoder)`` per step, a 0 PAD slot, ``/ sqrt(d_k)``."""

    def __init__(self, emb_size: int, d_k: int):
        super().__init__()
        self.d_k = d_k
        self.decode_fc = nn.Linear(emb_size, emb_size)
        self.encode_fc = nn.Linear(emb_size, emb_size)

    def forward(self, memory: torch.Tensor, decoder_out: torch.Tensor) -> torch.Tensor:
        """``memory [S, B, E]``, ``decoder_out [T, B, E]`` -> ``[T, B, S + 1, 1]``."""
        enc = self.encode_fc(memory).permute(1, 0, 2)  # [B, S, E]
        dec = self.decode_fc(decoder_out).permute(1, 2, 0)  # [B, E, T]
        out = torch.bmm(enc, dec).permute(2, 0, 1)  # [T, B, S]
        pad_slot = out.new_zeros(out.shape[0], out.shape[1], 1)
        return (torch.cat((out, pad_slot), dim=-1) / (self.d_k ** 0.5)).unsqueeze(-1)


def square_subsequent_mask(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The causal float mask ``[size, size]`` (0 on and below the diagonal, -inf above)."""
    mask = (torch.triu(torch.ones((size, size), device=device)) == 1).transpose(0, 1)
    return mask.float().masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0.0)


# -- model ---------------------------------------------------------------------------------

def _check_grid(grid: Any) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in grid)
        ok = all(int(v) == v for v in grid) and rows >= 1 and cols >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidInputError(f"grid must be (rows, cols) of positive ints, got {grid!r}")
    return rows, cols


class OAT(nn.Module):
    """The official ``Seq2SeqTransformer`` with ``functionChoice='learned'``, ``CAVersion=3``, ``spp=0``.

    ``grid``: ``(rows, cols)`` of the shelf, ``N = rows * cols`` objects; ``pe_table``: the
    position table (see :func:`load_position_table`; default the shipped Amazon one);
    ``tgt_vocab_size``: width of the unused ``generator`` (official ``package_size + 2``);
    ``seed``: the official ``TransformerModel`` seeds torch with 0 before building, then
    Xavier-uniform-initialises every parameter with ``dim > 1``; we do the same inside a forked
    RNG (``None``: draw from the global RNG). The other keywords are the official ones.
    """

    def __init__(self, grid: Sequence[int] = (6, 14), num_encoder_layers: int = 4, num_decoder_layers: int = 4,
                 emb_size: int = 512, nhead: int = 4, dim_feedforward: int = 512, CA_head: int = 2, CA_d_k: int = 512,
                 dropout: float = 0.1, pe_table: str | os.PathLike | np.ndarray | torch.Tensor = "amazon",
                 tgt_vocab_size: int | None = None, input_dimension: int = 3, seed: int | None = 0):
        super().__init__()
        self.grid = _check_grid(grid)
        rows, cols = self.grid
        self.num_objects = rows * cols
        table = load_position_table(pe_table)
        if emb_size < 2 or emb_size % 2 or emb_size % nhead:
            raise InvalidInputError(f"emb_size must be even and divisible by nhead, got emb_size={emb_size}, nhead={nhead}")
        if emb_size // 2 > 3 * table.shape[1]:
            raise InvalidInputError(f"emb_size/2 = {emb_size // 2} exceeds the 3 x {table.shape[1]} position-table columns")
        needed = max((self.num_objects + 1) // cols, cols - 1, rows // 2, 1) + 1
        if table.shape[0] + _EXTRA_PE_ROWS < needed:
            raise InvalidInputError(f"a {rows}x{cols} grid needs a position table with at least {needed - _EXTRA_PE_ROWS} rows, "
                                    f"got {table.shape[0]}")
        if min(num_encoder_layers, num_decoder_layers, CA_head, CA_d_k, dim_feedforward) < 1:
            raise InvalidInputError("layers, CA_head, CA_d_k and dim_feedforward must be >= 1")
        self.emb_size, self.pe_embed, self.CA_head, self.CA_d_k = emb_size, emb_size // 2, CA_head, CA_d_k
        self.eos_idx, self.pad_idx, self.bos_idx = self.num_objects, self.num_objects + 1, self.num_objects + 2
        vocab = self.num_objects + 2 if tgt_vocab_size is None else int(tgt_vocab_size)

        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
            if seed is not None:
                torch.manual_seed(int(seed))
            self.transformer_encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(d_model=emb_size, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout),
                num_layers=num_encoder_layers)
            self.transformer_decoder = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(d_model=emb_size, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout),
                num_layers=num_decoder_layers)
            # Unused by OAT (the output of CA_version 0); kept so official checkpoints load strictly.
            self.generator = nn.Linear(emb_size, vocab)
            self.onedpositional_encoding = PositionalEncoding(emb_size, dropout=dropout)
            self.cnn_embedding = CNNEmbedding(self.pe_embed)
            # Unused as well (an earlier position embedding); kept for the same reason.
            self.LinearEmbedding = nn.Linear(input_dimension, self.pe_embed)
            self.cross_attentions = nn.ModuleList(CrossAttention(emb_size, CA_d_k) for _ in range(CA_head))
            self.readout = nn.Linear(CA_head, 1)
            for p in self.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        # the official table + 4 zero rows; moves with .to() but is not part of the state dict
        self.register_buffer("pe", torch.cat((table, table.new_zeros(_EXTRA_PE_ROWS, table.shape[1]))), persistent=False)

    @classmethod
    def from_official_config(cls, kwargs: Mapping[str, Any], grid: Sequence[int],
                             pe_table: str | os.PathLike | np.ndarray | torch.Tensor | None = None, **overrides: Any) -> OAT:
        """From the official ``Seq2SeqTransformer`` keywords (``PE_path`` is the table unless
        ``pe_table`` is given); only the released choices (learned PE, CAVersion 3, spp 0) exist here."""
        args = dict(kwargs)
        checks = {"functionChoice": "learned", "CAVersion": 3, "spp": 0}
        for key, value in checks.items():
            if key in args and args.pop(key) != value:
                raise InvalidInputError(f"OAT supports only the released {key}={value!r}, got {kwargs[key]!r}")
        args.pop("alpha", None)  # used by the sinusoidal 3-D PE variants only
        args.pop("changeX", None)
        path = args.pop("PE_path", None)
        table = pe_table if pe_table is not None else path
        if table is None:
            raise InvalidInputError("pass pe_table (or PE_path in the official keywords)")
        args.update(overrides)
        return cls(grid=grid, pe_table=table, **args)

    # -- pieces of the forward pass ------------------------------------------------------

    def embed_positions(self, triples: torch.Tensor) -> torch.Tensor:
        """``(row, col, is_target)`` ``[L, B, 3]`` (floats, truncated) -> ``[L, B, emb/2]``."""
        idx = triples.long()
        pe = self.pe
        return torch.cat((pe[idx[..., 0]], pe[idx[..., 1]], pe[idx[..., 2]]), dim=-1)[..., : self.pe_embed]

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, L, 150, 93, 3]`` -> ``[L, B, emb/2]``."""
        return self.cnn_embedding(images).transpose(0, 1)

    def embed_source(self, src: torch.Tensor, src_img: torch.Tensor) -> torch.Tensor:
        feats = self.embed_images(src_img)
        return torch.cat((feats, self.embed_positions(src).to(feats.dtype)), dim=2)

    def embed_target(self, trg: torch.Tensor, tgt_features: torch.Tensor) -> torch.Tensor:
        """Decoder input from per-token appearance features ``[T, B, emb/2]`` and position triples."""
        x = torch.cat((tgt_features, self.embed_positions(trg).to(tgt_features.dtype)), dim=2)
        return self.onedpositional_encoding(x)

    def encode(self, src_emb: torch.Tensor, src_mask: torch.Tensor, src_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.transformer_encoder(src_emb, src_mask, src_padding_mask)

    def decode(self, tgt_emb: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor, tgt_padding_mask: torch.Tensor,
               memory_key_padding_mask: torch.Tensor) -> torch.Tensor:
        if tgt_mask is not None and tgt_mask.is_floating_point():
            tgt_mask = tgt_mask.to(tgt_emb.dtype)
            if tgt_padding_mask is not None and tgt_padding_mask.dtype == torch.bool:
                # what torch does to a bool mask beside a float one (the same numbers), minus its deprecation warning
                pad = torch.zeros_like(tgt_padding_mask, dtype=tgt_mask.dtype)
                tgt_padding_mask = pad.masked_fill_(tgt_padding_mask, float("-inf"))
        return self.transformer_decoder(tgt_emb, memory, tgt_mask, None, tgt_padding_mask, memory_key_padding_mask)

    def pointer_logits(self, memory: torch.Tensor, decoder_out: torch.Tensor) -> torch.Tensor:
        """``[T, B, S + 1]``: each step's scores over the S encoder tokens and the PAD slot."""
        out = torch.cat([head(memory, decoder_out) for head in self.cross_attentions], dim=-1)
        if self.CA_head != 1:
            out = self.readout(out)
        return out.squeeze(-1)

    def forward(self, src: torch.Tensor, trg: torch.Tensor, src_img: torch.Tensor, tgt_img: torch.Tensor,
                src_mask: torch.Tensor, tgt_mask: torch.Tensor, src_padding_mask: torch.Tensor,
                tgt_padding_mask: torch.Tensor, memory_key_padding_mask: torch.Tensor) -> torch.Tensor:
        """The official signature: position triples ``src [N+1, B, 3]``, ``trg [T, B, 3]``; images
        ``[B, N+1|T, 150, 93, 3]``; masks as :class:`OATBatch` holds them -> logits ``[T, B, N+2]``.
        The steps run in the official order (so training-mode dropout draws match it too)."""
        src_emb = self.embed_source(src, src_img)
        tgt_emb = self.embed_target(trg, self.embed_images(tgt_img))
        memory = self.encode(src_emb, src_mask, src_padding_mask)
        out = self.decode(tgt_emb, memory, tgt_mask, tgt_padding_mask, memory_key_padding_mask)
        return self.pointer_logits(memory, out)

    def forward_batch(self, batch: OATBatch) -> torch.Tensor:
        """Teacher-forced logits ``[T, B, N+2]`` of a :func:`collate_oat` batch."""
        b = batch.to(self.pe.device)
        dtype = self.readout.weight.dtype
        return self(b.src, b.trg, b.src_img.to(dtype), b.tgt_img_input.to(dtype), b.src_mask, b.tgt_mask,
                    b.src_padding_mask, b.tgt_padding_mask, b.memory_key_padding_mask)

    def generate(self, crops: Any, target: Any, max_len: int, **kwargs: Any) -> list[list[OATScanpath]]:
        """See :func:`generate`."""
        return generate(self, crops, target, max_len, **kwargs)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, num_objects={self.num_objects}, emb_size={self.emb_size}, CA_head={self.CA_head}"


# -- preprocessing -------------------------------------------------------------------------

def _cv2_linear_taps(n_in: int, n_out: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and float32 weights of ``cv2.resize(INTER_LINEAR)`` along one axis.

    cv2 computes ``f = float((d + 0.5) * n_in / n_out - 0.5)`` in float32 and clamps the weights
    at the borders along x only (along y it clamps the source rows, keeping the weights).
    """
    d = np.arange(n_out, dtype=np.float64)
    f = ((d + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp:
        f[s < 0] = 0
        s[s < 0] = 0
        f[s >= n_in - 1] = 0
        s[s >= n_in - 1] = n_in - 1
    idx = np.stack((np.clip(s, 0, n_in - 1), np.clip(s + 1, 0, n_in - 1)))
    return idx, np.float32(1) - f, f


def _resize_like_cv2(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(img, (width, height))`` with ``INTER_LINEAR`` on an ``[H, W, C]`` array.

    uint8: cv2's fixed-point arithmetic (11-bit weights, its rounding), bit-exact. Float: the same
    taps in float32 (within float rounding of cv2).
    """
    h_in, w_in = img.shape[:2]
    xi, xa0, xa1 = _cv2_linear_taps(w_in, width, clamp=True)
    yi, ya0, ya1 = _cv2_linear_taps(h_in, height, clamp=False)
    if img.dtype == np.uint8:
        x = img.astype(np.int64)
        ax0, ax1 = np.rint(xa0 * np.float32(2048)).astype(np.int64), np.rint(xa1 * np.float32(2048)).astype(np.int64)
        ay0, ay1 = np.rint(ya0 * np.float32(2048)).astype(np.int64), np.rint(ya1 * np.float32(2048)).astype(np.int64)
        rows = x[:, xi[0]] * ax0[None, :, None] + x[:, xi[1]] * ax1[None, :, None]
        out = ((ay0[:, None, None] * (rows[yi[0]] >> 4)) >> 16) + ((ay1[:, None, None] * (rows[yi[1]] >> 4)) >> 16)
        return ((out + 2) >> 2).clip(0, 255).astype(np.uint8)
    x = img.astype(np.float32)
    rows = x[:, xi[0]] * xa0[None, :, None] + x[:, xi[1]] * xa1[None, :, None]
    return rows[yi[0]] * ya0[:, None, None] + rows[yi[1]] * ya1[:, None, None]


def crop_objects(image: Any, boxes: Any, size: tuple[int, int] = CROP_SIZE, colour_order: str = "bgr",
                 grid: Sequence[int] | None = None) -> torch.Tensor:
    """Object crops as the official preprocessing makes them: ``[N, H, W, 3]`` BGR, ``(H, W) = size``.

    ``image``: ``[H, W, 3]`` (numpy or torch) uint8 or float, in ``colour_order`` (``"bgr"`` as
    ``cv2.imread`` gives it, or ``"rgb"``, flipped to BGR); ``boxes``: ``[N, 4]`` pixel
    ``(x0, y0, x1, y1)`` with exclusive ends (the official ``image[y0:y1, x0:x1]``), rounded to
    ints, in reading order. Each crop is resized like ``cv2.resize(crop, (W, H))`` (``INTER_LINEAR``:
    bit-exact for uint8, cv2's fixed-point arithmetic emulated; for float images the same taps in
    float32, within 0.01 grey levels of cv2). uint8 in, uint8 out; float in, float32 out.
    ``grid``: when given, the boxes must be exactly ``rows * cols``.
    """
    order = colour_order.lower() if isinstance(colour_order, str) else colour_order
    if order not in ("bgr", "rgb"):
        raise InvalidInputError(f"colour_order must be 'bgr' or 'rgb', got {colour_order!r}")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise InvalidInputError(f"image must be [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8 and arr.dtype.kind != "f":
        raise InvalidInputError(f"image must be uint8 or float, got {arr.dtype}")
    if order == "rgb":
        arr = arr[:, :, ::-1]
    try:
        out_h, out_w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidInputError(f"size must be (H, W), got {size!r}") from None
    if out_h < 1 or out_w < 1:
        raise InvalidInputError(f"size must be positive, got {size!r}")
    b = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] == 0 or not np.isfinite(b).all():
        raise InvalidInputError(f"boxes must be a finite [N, 4] array of (x0, y0, x1, y1), got shape {b.shape}")
    if grid is not None and b.shape[0] != math.prod(_check_grid(grid)):
        raise InvalidInputError(f"got {b.shape[0]} boxes but the {tuple(grid)} grid has {math.prod(_check_grid(grid))} objects")
    b = np.rint(b).astype(np.int64)
    h, w = arr.shape[:2]
    crops = []
    for i, (x0, y0, x1, y1) in enumerate(b):
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise InvalidInputError(f"box {i} ({x0}, {y0}, {x1}, {y1}) is empty or outside the {w}x{h} image")
        crops.append(_resize_like_cv2(np.ascontiguousarray(arr[y0:y1, x0:x1]), out_h, out_w))
    return torch.from_numpy(np.stack(crops))


@dataclass
class OATSample:
    """One search trial as OAT sees it: the display's object crops, the target and the fixations.

    ``crops``: ``[N, 150, 93, 3]`` BGR (uint8 or 0-255 float), in reading order; ``target``: 0-based
    target object; ``sequence``: the 0-based object of each fixation (the published data ends with
    the fixation on the target; EOS is added by :func:`collate_oat`).
    """

    crops: Any
    target: int
    sequence: Sequence[int]

    @classmethod
    def from_search_trial(cls, trial: Any, image: Any = None, colour_order: str = "rgb") -> OATSample:
        """From a :class:`~attnzoo.datasets.scanpaths.SearchTrial` (boxes, grid, target, objects).

        ``image`` (in ``colour_order``) defaults to ``trial.image_path`` read with PIL as RGB (JPEG
        decoders may differ from the official ``cv.imread`` by a grey level)."""
        if image is None:
            from PIL import Image

            with Image.open(trial.image_path) as im:
                image = np.asarray(im.convert("RGB"))
        grid = tuple(trial.grid) if tuple(trial.grid) != (0, 0) else None
        crops = crop_objects(image, trial.boxes, colour_order=colour_order, grid=grid)
        return cls(crops, int(trial.target), [int(o) for o in np.asarray(trial.objects).reshape(-1)])


def _as_index(value: Any, n: int, what: str) -> int:
    if isinstance(value, torch.Tensor | np.ndarray):
        count = value.size if isinstance(value, np.ndarray) else value.numel()
        if count != 1 or value.dtype in (torch.bool, np.bool_) or (value.dtype.is_floating_point if isinstance(value, torch.Tensor)
                                                                  else value.dtype.kind not in "iu"):
            raise InvalidInputError(f"{what} must be one integer, got {value.dtype} of shape {tuple(value.shape)}")
        value = value.reshape(-1)[0].item()
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInputError(f"{what} must be an integer object index, got {value!r}")
    value = int(value)
    if not 0 <= value < n:
        raise InvalidInputError(f"{what} {value} is outside the display's {n} objects (0-based)")
    return value


def _as_crops(crops: Any, n: int, what: str = "crops") -> torch.Tensor:
    if isinstance(crops, np.ndarray):
        crops = torch.from_numpy(np.ascontiguousarray(crops))
    if not isinstance(crops, torch.Tensor):
        raise InvalidInputError(f"{what} must be a tensor or array [N, 150, 93, 3], got {type(crops).__name__}")
    if crops.dim() != 4 or tuple(crops.shape[1:]) != (*CROP_SIZE, 3):
        raise InvalidInputError(f"{what} must be [N, {CROP_SIZE[0]}, {CROP_SIZE[1]}, 3] BGR crops (make them with crop_objects), "
                                f"got shape {tuple(crops.shape)}")
    if crops.shape[0] != n:
        raise InvalidInputError(f"{what} hold {crops.shape[0]} objects but the grid has {n}")
    if crops.dtype != torch.uint8 and not crops.is_floating_point():
        raise InvalidInputError(f"{what} must be uint8 or float (0-255), got {crops.dtype}")
    return crops.float()


def _as_sample(sample: Any, n: int, index: int) -> tuple[torch.Tensor, int, list[int]]:
    if isinstance(sample, OATSample):
        crops, target, seq = sample.crops, sample.target, sample.sequence
    else:
        try:
            crops, target, seq = sample
        except (TypeError, ValueError):
            raise InvalidInputError(f"sample {index} must be an OATSample or (crops, target, sequence)") from None
    crops = _as_crops(crops, n, f"sample {index}'s crops")
    target = _as_index(target, n, f"sample {index}'s target")
    seq_arr = seq.detach().cpu().numpy() if isinstance(seq, torch.Tensor) else np.asarray(seq)
    if seq_arr.ndim != 1 or seq_arr.size == 0:
        raise InvalidInputError(f"sample {index}'s sequence must be a non-empty 1-D list of object indices")
    return crops, target, [_as_index(v, n, f"sample {index}'s fixation {j}") for j, v in enumerate(seq_arr.tolist())]


# -- batching (official Collator_pure + processData3d) -------------------------------------

@dataclass
class OATBatch:
    """A collated batch: the official collator's four tensors and the model's forward arguments."""

    src_pos: torch.Tensor  # [N+1, B] int64: 0..N-1 then the target
    tgt_pos: torch.Tensor  # [L, B] int64: BOS, fixations, EOS, PAD...
    src_img: torch.Tensor  # [B, N+1, 150, 93, 3] float32 BGR 0-255
    tgt_img: torch.Tensor  # [B, L, 150, 93, 3] float32 (all-ones blanks for BOS/EOS/PAD)
    src: torch.Tensor  # [N+1, B, 3] (row, col, is_target)
    trg: torch.Tensor  # [L-1, B, 3]
    src_mask: torch.Tensor  # [N+1, N+1] bool, all False
    tgt_mask: torch.Tensor  # [L-1, L-1] float causal (0 / -inf)
    src_padding_mask: torch.Tensor  # [B, N+1] bool
    tgt_padding_mask: torch.Tensor  # [B, L-1] bool, True at PAD inputs
    memory_key_padding_mask: torch.Tensor  # [B, N+1] bool (= src_padding_mask)
    pad_idx: int

    @property
    def tgt_img_input(self) -> torch.Tensor:
        return self.tgt_img[:, :-1]

    @property
    def tgt_out(self) -> torch.Tensor:
        """``[L-1, B]``: what each step should point at."""
        return self.tgt_pos[1:]

    def to(self, device: torch.device | str) -> OATBatch:
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return OATBatch(**fields)


def position_triples(tokens: torch.Tensor, target: torch.Tensor, grid: Sequence[int], *, decoder: bool) -> torch.Tensor:
    """``(row, col, is_target)`` float ``[L, B, 3]`` of pointer ``tokens [L, B]`` (official ``generate3DInput``).

    Encoder (``decoder=False``): the last token is the target token (flag 1). Decoder: the first
    token (BOS) sits at ``(rows/2, cols/2)``; the flag is 1 wherever the token is the target object.
    """
    rows, cols = grid
    out = torch.zeros((*tokens.shape, 3), device=tokens.device)
    out[..., 0] = tokens // cols
    out[..., 1] = torch.remainder(tokens, cols)
    if decoder:
        out[0, :, 0] = float(rows) / 2
        out[0, :, 1] = float(cols) / 2
        out[..., 2] = (tokens == target.view(1, -1)).float()
    else:
        out[-1, :, 2] = 1
    return out


def collate_oat(samples: Sequence[Any], grid: Sequence[int]) -> OATBatch:
    """Samples (:class:`OATSample` or ``(crops, target, sequence)``, 0-based) -> an :class:`OATBatch`,
    exactly as the official ``Collator_pure`` followed by ``processData3d``."""
    rows, cols = _check_grid(grid)
    n = rows * cols
    if not isinstance(samples, Sequence) or len(samples) == 0:
        raise InvalidInputError("collate_oat needs a non-empty list of samples")
    eos, pad, bos = n, n + 1, n + 2
    items = [_as_sample(s, n, i) for i, s in enumerate(samples)]
    seqs = [torch.tensor([bos, *seq, eos], dtype=torch.int64) for _, _, seq in items]
    tgt_pos = nn.utils.rnn.pad_sequence(seqs, padding_value=pad, batch_first=False)  # [L, B]
    src_pos = torch.stack([torch.cat((torch.arange(n), torch.tensor([t]))) for _, t, _ in items]).T  # [N+1, B]
    src_img, tgt_img = [], []
    for b, (crops, _, _) in enumerate(items):
        images = torch.cat((crops, torch.ones((_N_BLANKS, *crops.shape[1:]))))  # crops, then EOS/PAD/BOS blanks
        src_img.append(images[src_pos[:, b]])
        tgt_img.append(images[tgt_pos[:, b]])
    tgt_input = tgt_pos[:-1]
    target = src_pos[-1]
    src_padding = (src_pos == pad).transpose(0, 1)
    return OATBatch(
        src_pos=src_pos, tgt_pos=tgt_pos, src_img=torch.stack(src_img), tgt_img=torch.stack(tgt_img),
        src=position_triples(src_pos, target, (rows, cols), decoder=False),
        trg=position_triples(tgt_input, target, (rows, cols), decoder=True),
        src_mask=torch.zeros((n + 1, n + 1), dtype=torch.bool), tgt_mask=square_subsequent_mask(tgt_input.shape[0]),
        src_padding_mask=src_padding, tgt_padding_mask=(tgt_input == pad).transpose(0, 1),
        memory_key_padding_mask=src_padding, pad_idx=pad,
    )


def oat_loss(logits: torch.Tensor, tgt_pos: torch.Tensor, pad_idx: int) -> torch.Tensor:
    """Cross-entropy of teacher-forced logits ``[L-1, B, N+2]`` against ``tgt_pos[1:]``, PAD ignored."""
    target = tgt_pos[1:]
    if logits.shape[:2] != target.shape:
        raise InvalidInputError(f"logits {tuple(logits.shape)} do not match tgt_pos[1:] {tuple(target.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).to(logits.device), ignore_index=pad_idx)


def teacher_forced_loss(model: OAT, batch: OATBatch) -> torch.Tensor:
    """The official training loss (``train_batch_teacher_forcing``) of a :func:`collate_oat` batch."""
    if batch.pad_idx != model.pad_idx:
        raise InvalidInputError(f"the batch was collated for {batch.pad_idx - 1} objects, the model has {model.num_objects}")
    return oat_loss(model.forward_batch(batch), batch.tgt_pos, model.pad_idx)


# -- decoding (official test_max / test_expect) -------------------------------------------

class OATScanpath(NamedTuple):
    """One decoded scanpath."""

    objects: list[int]
    """0-based fixated objects, the EOS excluded (the official truncated ``GAZE``); a model trained on
    the published data ends a terminated scanpath with the target object."""
    terminated: bool
    """Whether the model pointed at the target token (EOS) within ``max_len`` steps."""


class OATGreedyEval(NamedTuple):
    """The official ``test_max`` of one sample: greedy decode plus the per-step losses."""

    gaze: torch.Tensor  # [K] int64, objects before the first EOS
    loss: torch.Tensor  # sum of the step losses / (len(sequence) + 1)
    step_losses: torch.Tensor  # [len(sequence) + 1]: CE of each step vs the ground truth, -1 past max_len


@dataclass
class _Displays:
    """What decoding reuses at every step: encoder memory and appearance features per display."""

    memory: torch.Tensor  # [N+1, B, E]
    features: torch.Tensor  # [B, N + 4, E/2]: the N crops, then the four (zero) test-time blanks
    bos: torch.Tensor  # [B, E/2]: the all-ones BOS blank
    target: torch.Tensor  # [B]


def _prepare(model: OAT, crops: torch.Tensor, targets: torch.Tensor) -> _Displays:
    """Encode ``B`` displays once (the official decode recomputes the same thing at every step)."""
    b, n = crops.shape[:2]
    device = model.pe.device
    src_pos = torch.cat((torch.arange(n, device=device).expand(b, n), targets.view(b, 1)), dim=1).T  # [N+1, B]
    src_img = torch.cat((crops, crops[torch.arange(b, device=device), targets].unsqueeze(1)), dim=1)
    src_emb = model.embed_source(position_triples(src_pos, targets, model.grid, decoder=False), src_img)
    src_mask = torch.zeros((n + 1, n + 1), dtype=torch.bool, device=device)
    padding = torch.zeros((b, n + 1), dtype=torch.bool, device=device)
    memory = model.encode(src_emb, src_mask, padding)
    crop_features = src_emb[:n, :, : model.pe_embed].transpose(0, 1)  # [B, N, E/2]
    blanks = torch.stack((torch.zeros(crops.shape[2:], dtype=crops.dtype, device=device),
                          torch.ones(crops.shape[2:], dtype=crops.dtype, device=device)))
    blank_features = model.cnn_embedding(blanks.unsqueeze(0))[0]  # [2, E/2]: zeros, ones
    features = torch.cat((crop_features, blank_features[0].expand(b, _N_BLANKS, -1)), dim=1)
    return _Displays(memory, features, blank_features[1].expand(b, -1), targets)


def _step_logits(model: OAT, ctx: _Displays, display: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Pointer logits ``[n, N+2]`` of the last step for ``n`` prefixes ``tokens [i, n]`` (BOS first)."""
    steps, count = tokens.shape
    device = tokens.device
    target = ctx.target[display]
    feats = ctx.features[display.view(1, -1), tokens.clamp(max=ctx.features.shape[1] - 1)]  # [i, n, E/2]
    feats = torch.cat((ctx.bos[display].unsqueeze(0), feats[1:]), dim=0)
    tgt_emb = model.embed_target(position_triples(tokens, target, model.grid, decoder=True), feats)
    memory = ctx.memory[:, display]
    padding = torch.zeros((count, steps), dtype=torch.bool, device=device)
    memory_padding = torch.zeros((count, memory.shape[0]), dtype=torch.bool, device=device)
    out = model.decode(tgt_emb, memory, square_subsequent_mask(steps, device), padding, memory_padding)
    return model.pointer_logits(memory, out)[-1]


def _allowed(logits: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """Step 1 may point at objects only; later steps at objects or EOS (official slicing)."""
    return logits[:, :n] if step == 1 else logits[:, : n + 1]


def _as_displays(model: OAT, crops: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    n = model.num_objects
    if isinstance(crops, np.ndarray):
        crops = torch.from_numpy(np.ascontiguousarray(crops))
    if isinstance(crops, torch.Tensor) and crops.dim() == 4:
        crops, target = [crops], [target]
    elif isinstance(crops, torch.Tensor) and crops.dim() == 5:
        crops = list(crops)
    elif not isinstance(crops, (list, tuple)) or not crops:
        raise InvalidInputError("crops must be one display [N, 150, 93, 3], a batch [B, N, 150, 93, 3] or a list of displays")
    if isinstance(target, torch.Tensor | np.ndarray):
        target = target.reshape(-1).tolist()
    elif not isinstance(target, (list, tuple)):
        target = [target]
    if len(target) != len(crops):
        raise InvalidInputError(f"got {len(crops)} displays but {len(target)} targets")
    dtype = model.readout.weight.dtype
    stacked = torch.stack([_as_crops(c, n, f"display {i}'s crops") for i, c in enumerate(crops)]).to(model.pe.device, dtype)
    targets = torch.tensor([_as_index(t, n, f"display {i}'s target") for i, t in enumerate(target)], device=model.pe.device)
    return stacked, targets


def _check_max_len(max_len: Any) -> int:
    if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer) or max_len < 1:
        raise InvalidInputError(f"max_len must be a positive int (the official value: the longest training sequence), got {max_len!r}")
    return int(max_len)


def _trial_seeds(generator: torch.Generator | None, count: int) -> list[int]:
    """One seed per trial, drawn one after another (so the first k of n are the seeds of k)."""
    return [int(torch.randint(0, 2**62, (1,), generator=generator)) for _ in range(count)]


@torch.no_grad()
def generate(model: OAT, crops: Any, target: Any, max_len: int, *, grid: Sequence[int] | None = None,
             strategy: str = "greedy", num_samples: int | None = None, generator: torch.Generator | int | None = None,
             seeds: Sequence[int] | None = None) -> list[list[OATScanpath]]:
    """Decode scanpaths: ``result[display][trial]`` (one trial for greedy).

    ``crops``: one display ``[N, 150, 93, 3]`` (BGR, uint8 or 0-255 float), a batch
    ``[B, N, 150, 93, 3]`` or a list of displays; ``target``: the 0-based target object (one per
    display); ``max_len``: at most this many fixations (officially the longest training sequence);
    ``grid``: optional check against the model's. ``strategy="greedy"`` is the official ``test_max``,
    ``"sample"`` the official ``test_expect`` (``num_samples`` multinomial trials per display, 100 in
    the official evaluation). Step 1 never ends the scanpath; a trial ends when it points at the
    target token (``terminated=True``) or after ``max_len`` fixations.

    All trials of all displays decode together; a finished trial leaves the batch. Sampling uses
    one ``torch.Generator`` per trial seeded from ``seeds`` (one int per trial, display-major) or,
    without them, from ints drawn one by one from ``generator`` (an int seed, a generator, or
    ``None`` for torch's global RNG). A trial's scanpath therefore depends only on its seed:
    decoding it alone with ``seeds=[its seed]`` gives the same result (up to float ties, since a
    batch may round the last bit differently). The official code instead samples all its trials one
    after another from the global RNG, so its random stream is not reproduced.
    """
    if grid is not None and _check_grid(grid) != model.grid:
        raise InvalidInputError(f"grid {tuple(grid)} does not match the model's {model.grid}")
    max_len = _check_max_len(max_len)
    if strategy not in ("greedy", "sample"):
        raise InvalidInputError(f"strategy must be 'greedy' or 'sample', got {strategy!r}")
    if strategy == "greedy":
        if num_samples not in (None, 1) or seeds is not None:
            raise InvalidInputError("greedy decoding is deterministic: num_samples and seeds apply to strategy='sample'")
        per_display = 1
    else:
        per_display = 100 if num_samples is None else num_samples
        if isinstance(per_display, bool) or not isinstance(per_display, int) or per_display < 1:
            raise InvalidInputError(f"num_samples must be a positive int, got {num_samples!r}")
    crops_t, targets = _as_displays(model, crops, target)
    n_displays = crops_t.shape[0]
    total = n_displays * per_display
    generators: list[torch.Generator] = []
    if strategy == "sample":
        if seeds is None:
            seeds = _trial_seeds(as_generator(generator), total)
        elif len(seeds) != total:
            raise InvalidInputError(f"seeds must hold one int per trial ({n_displays} displays x {per_display} = {total}), got {len(seeds)}")
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    was_training = model.training
    model.eval()
    try:
        ctx = _prepare(model, crops_t, targets)
        device = model.pe.device
        n = model.num_objects
        display_of = torch.arange(n_displays, device=device).repeat_interleave(per_display)
        tokens = torch.full((max_len + 1, total), model.bos_idx, dtype=torch.int64, device=device)
        lengths = [max_len] * total
        terminated = [False] * total
        active = torch.arange(total, device=device)
        for step in range(1, max_len + 1):
            logits = _allowed(_step_logits(model, ctx, display_of[active], tokens[:step, active]), step, n)
            if strategy == "greedy":
                chosen = torch.max(logits, 1)[1]
            else:
                probs = F.softmax(logits.float(), dim=1).cpu()
                chosen = torch.stack([torch.multinomial(probs[j], 1, replacement=True, generator=generators[int(t)])[0]
                                      for j, t in enumerate(active.tolist())]).to(device)
            tokens[step, active] = chosen
            done = chosen == model.eos_idx
            for t in active[done].tolist():
                terminated[t], lengths[t] = True, step - 1
            active = active[~done]
            if active.numel() == 0:
                break
    finally:
        model.train(was_training)
    paths = [OATScanpath(tokens[1: lengths[t] + 1, t].tolist(), terminated[t]) for t in range(total)]
    return [paths[d * per_display:(d + 1) * per_display] for d in range(n_displays)]


@torch.no_grad()
def greedy_eval(model: OAT, sample: Any, max_len: int) -> OATGreedyEval:
    """The official ``test_max`` on one sample (batch 1): the greedy scanpath and its step losses.

    Step ``i`` is scored (cross-entropy over the allowed slots, as the official slicing) against
    the ground truth's ``i``-th pointer while ``i <= len(sequence) + 1``; decoding continues past a
    predicted EOS (fed with a zero blank) until that many steps are scored, which changes only the
    losses. ``loss`` = sum of the scored steps / ``(len(sequence) + 1)``.
    """
    max_len = _check_max_len(max_len)
    crops, target, seq = _as_sample(sample, model.num_objects, 0)
    n = model.num_objects
    gt = [model.bos_idx, *seq, model.eos_idx]
    length = len(gt)
    was_training = model.training
    model.eval()
    try:
        device = model.pe.device
        ctx = _prepare(model, crops.unsqueeze(0).to(device, model.readout.weight.dtype), torch.tensor([target], device=device))
        display = torch.zeros(1, dtype=torch.int64, device=device)
        tokens = [model.bos_idx]
        dtype = model.readout.weight.dtype
        step_losses = torch.full((length - 1,), -1.0, dtype=dtype)
        loss = torch.zeros((), dtype=dtype)
        gaze: list[int] = []
        for step in range(1, max_len + 1):
            prefix = torch.tensor(tokens, dtype=torch.int64, device=device).view(-1, 1)
            logits = _allowed(_step_logits(model, ctx, display, prefix), step, n)
            predicted = int(torch.max(logits, 1)[1])
            if step < length:
                step_loss = F.cross_entropy(logits, torch.tensor([gt[step]], device=device), ignore_index=model.pad_idx).cpu()
                step_losses[step - 1] = step_loss
                loss = loss + step_loss
            gaze.append(predicted)
            if model.eos_idx in gaze and step >= length:
                break
            tokens.append(predicted)
    finally:
        model.train(was_training)
    if model.eos_idx in gaze:
        gaze = gaze[: gaze.index(model.eos_idx)]
    return OATGreedyEval(torch.tensor(gaze, dtype=torch.int64), loss / (length - 1), step_losses)


# -- weights -------------------------------------------------------------------------------

def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """An official Lightning checkpoint (``{'state_dict': {'model.<key>': ...}}``) or a bare state
    dict (with or without ``model.``/``module.``) -> our state dict (the same key names)."""
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"an OAT checkpoint is a dict, got {type(checkpoint).__name__}")
    state: Any = checkpoint
    while isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "model."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    if not tensors:
        raise WeightsError(f"not an OAT checkpoint: no tensors under 'state_dict'; keys: {sorted(map(str, checkpoint))[:10]}")
    return tensors


def _cfg(grid: tuple[int, int], table: str, crop_style: str = "bgr", **kwargs: Any) -> dict[str, Any]:
    shelf = crop_style == "rgb_minmax"
    return {"grid": grid, "num_objects": grid[0] * grid[1], "pe_table": table, "input_size": (3, *CROP_SIZE),
            "crop_style": crop_style, "colour_order": "RGB" if shelf else "BGR", "pixel_range": (0, 1) if shelf else (0, 255),
            "interpolation": "bilinear (cv2 INTER_LINEAR)", "weights": None, "license": "no licence in the official repository",
            **kwargs}


# No pretrained weights exist for any variant (the authors released none). The crops differ by
# dataset as in the official preprocessing: img_feature_amazon.py keeps cv2's BGR 0-255, while
# img_feature.py (the shelves) converts to RGB and min-max scales each crop to [0, 1].
default_cfgs: dict[str, dict[str, Any]] = {
    "oat_amazon": _cfg((6, 14), "amazon", dataset="Amazon book covers (STI-Dataset)"),
    "oat_yogurt": _cfg((3, 9), "yogurt", "rgb_minmax", dataset="OAT shelf data, yogurt (Q3)"),
    "oat_wine": _cfg((2, 11), "wine", "rgb_minmax", dataset="OAT shelf data, wine (Q1)"),
}

CROP_STYLES = ("bgr", "rgb_minmax")


def display_crops(image: Any, boxes: Any, crop_style: str = "bgr", grid: Sequence[int] | None = None) -> torch.Tensor:
    """The object crops of an RGB display as an OAT variant was trained on them (its
    ``pretrained_cfg["crop_style"]``): ``"bgr"`` (Amazon) uint8 BGR 0-255; ``"rgb_minmax"`` (the
    yogurt and wine shelves) float32 RGB, each crop scaled to [0, 1] by its own minimum and maximum
    over all channels, as ``cv2.normalize(crop, None, 0, 1, NORM_MINMAX, CV_32F)`` (a flat crop: zeros).
    """
    if crop_style == "bgr":
        return crop_objects(image, boxes, colour_order="rgb", grid=grid)
    if crop_style != "rgb_minmax":
        raise InvalidInputError(f"crop_style must be one of {CROP_STYLES}, got {crop_style!r}")
    crops = crop_objects(image, boxes, colour_order="bgr", grid=grid).numpy().astype(np.float64)  # "bgr": kept as given, RGB
    low = crops.min(axis=(1, 2, 3), keepdims=True)
    span = crops.max(axis=(1, 2, 3), keepdims=True) - low
    scale = np.where(span > np.finfo(np.float64).eps, 1.0 / np.where(span > 0, span, 1.0), 0.0)
    return torch.from_numpy((crops * scale - low * scale).astype(np.float32))


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> OAT:
    if pretrained:
        raise WeightsError(f"no pretrained {name} weights exist (the authors released none): train the model, or load "
                           f"your own checkpoint with attnzoo.create_model({name!r}, weights=PATH)")
    cfg = default_cfgs[name]
    kwargs.setdefault("pe_table", cfg["pe_table"])
    model = OAT(grid=kwargs.pop("grid", cfg["grid"]), **kwargs)
    model.pretrained_cfg = dict(cfg)
    return model


@register_model
def oat_amazon(pretrained: bool = False, **kwargs: Any) -> OAT:
    """OAT for the Amazon book-cover collages: 6x14 = 84 objects, 18,300,985 params."""
    return _create("oat_amazon", pretrained, kwargs)


@register_model
def oat_yogurt(pretrained: bool = False, **kwargs: Any) -> OAT:
    """OAT for the yogurt shelves (3x9 = 27 objects), with the sigma 2.5 position table."""
    return _create("oat_yogurt", pretrained, kwargs)


@register_model
def oat_wine(pretrained: bool = False, **kwargs: Any) -> OAT:
    """OAT for the wine shelves (2x11 = 22 objects), with the sigma 2 table of 11 rows."""
    return _create("oat_wine", pretrained, kwargs)
