"""OAT: Object-level Attention Transformer for gaze scanpath prediction in visual search.

Fang, Yu, Chen, Tong, Teoh, Wong, Huang. ECCV 2024. https://arxiv.org/abs/2407.13335
Official code: https://github.com/HKUST-NISL/oat_eccv24 (src/model/models.py ``Seq2SeqTransformer``,
``CNNEmbedding``, ``Cross_Attention``, ``PositionalEncoding``; src/model/positionalEncoding.py
``calculate3DPositional_learned``; src/model/positionalEncodingLearned.py; src/model/transformerLightning.py
``TransformerModel.__init__``). The repository has no licence: nothing of it is copied here (the
position tables we ship are our own, made by the published procedure, see :func:`make_position_table`).

A display holds ``N = rows * cols`` objects on a shelf grid (Amazon covers 6x14, yogurt 3x9,
wine 2x11), object ``i`` at ``(i // cols, i % cols)``. Pointer vocabulary, for N objects:

=========  ====================================================================
0 .. N-1   the objects, in reading order
N          EOS, which is also the encoder's *target token*: pointing at it ends the scanpath
N + 1      PAD (a constant logit slot; never predicted)
N + 2      BOS (decoder input only)
=========  ====================================================================

* **Tokens** are ``cat(appearance, position)``, ``emb_size/2`` each. Appearance: a small CNN from
  scratch on ``150 x 93`` **BGR 0-255 float** crops (:func:`~attnzoo.vision.oat_inputs.crop_objects`).
  Position: the fixed learned table ``pe`` (+4 zero rows) indexed by ``(row, col, is_target)``:
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

The crops, samples and teacher-forcing batches are made by :mod:`attnzoo.vision.oat_inputs`;
decoding (the official ``test_max``/``test_expect``) is :mod:`attnzoo.vision.oat_decoding`; the
teacher-forced loss of the training recipe is in :mod:`attnzoo.training.scanpath`.

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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.errors import InvalidInputError, WeightsError
from attnzoo.registry import register_model
from attnzoo.vision.oat_decoding import OATScanpath, generate
from attnzoo.vision.oat_inputs import CROP_SIZE, OATBatch, check_grid

__all__ = [
    "OAT",
    "POSITION_TABLES",
    "checkpoint_filter_fn",
    "default_cfgs",
    "load_position_table",
    "make_position_table",
    "oat_amazon",
    "oat_wine",
    "oat_yogurt",
]

PE_COLUMNS = 86  # width of the learned position table
_EXTRA_PE_ROWS = 4  # zero rows the official model appends to the table
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


def make_position_table(
    n: int, sigma: float, seed: int = 0, iterations: int = 10000, *, columns: int = PE_COLUMNS, lr: float = 0.01
) -> np.ndarray:
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
            raise InvalidInputError(
                f"cannot read the position table {os.fspath(table)!r} ({err}); pass a .npy file of a "
                f"[rows, columns] float array or one of {sorted(POSITION_TABLES)}"
            ) from None
    elif isinstance(table, torch.Tensor):
        arr = table.detach().cpu().numpy()
    elif isinstance(table, np.ndarray):
        arr = table
    else:
        raise InvalidInputError(
            f"pe_table must be a name ({', '.join(sorted(POSITION_TABLES))}), a .npy path or an array, "
            f"got {type(table).__name__}"
        )
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind not in "fiu" or 0 in arr.shape:
        raise InvalidInputError(
            f"a position table is a non-empty 2-D numeric array [rows, columns], got "
            f"{getattr(arr, 'shape', None)} {getattr(arr, 'dtype', type(arr).__name__)}"
        )
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
        return (torch.cat((out, pad_slot), dim=-1) / (self.d_k**0.5)).unsqueeze(-1)


# -- model ---------------------------------------------------------------------------------


class OAT(nn.Module):
    """The official ``Seq2SeqTransformer`` with ``functionChoice='learned'``, ``CAVersion=3``, ``spp=0``.

    ``grid``: ``(rows, cols)`` of the shelf, ``N = rows * cols`` objects; ``pe_table``: the
    position table (see :func:`load_position_table`; default the shipped Amazon one);
    ``tgt_vocab_size``: width of the unused ``generator`` (official ``package_size + 2``);
    ``seed``: the official ``TransformerModel`` seeds torch with 0 before building, then
    Xavier-uniform-initialises every parameter with ``dim > 1``; we do the same inside a forked
    RNG (``None``: draw from the global RNG). The other keywords are the official ones.
    """

    def __init__(
        self,
        grid: Sequence[int] = (6, 14),
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        emb_size: int = 512,
        nhead: int = 4,
        dim_feedforward: int = 512,
        CA_head: int = 2,
        CA_d_k: int = 512,
        dropout: float = 0.1,
        pe_table: str | os.PathLike | np.ndarray | torch.Tensor = "amazon",
        tgt_vocab_size: int | None = None,
        input_dimension: int = 3,
        seed: int | None = 0,
    ):
        super().__init__()
        self.grid = check_grid(grid)
        rows, cols = self.grid
        self.num_objects = rows * cols
        table = load_position_table(pe_table)
        if emb_size < 2 or emb_size % 2 or emb_size % nhead:
            raise InvalidInputError(
                f"emb_size must be even and divisible by nhead, got emb_size={emb_size}, nhead={nhead}"
            )
        if emb_size // 2 > 3 * table.shape[1]:
            raise InvalidInputError(
                f"emb_size/2 = {emb_size // 2} exceeds the 3 x {table.shape[1]} position-table columns"
            )
        needed = max((self.num_objects + 1) // cols, cols - 1, rows // 2, 1) + 1
        if table.shape[0] + _EXTRA_PE_ROWS < needed:
            raise InvalidInputError(
                f"a {rows}x{cols} grid needs a position table with at least {needed - _EXTRA_PE_ROWS} rows, "
                f"got {table.shape[0]}"
            )
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
                nn.TransformerEncoderLayer(
                    d_model=emb_size, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout
                ),
                num_layers=num_encoder_layers,
            )
            self.transformer_decoder = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(
                    d_model=emb_size, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout
                ),
                num_layers=num_decoder_layers,
            )
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
        self.register_buffer(
            "pe", torch.cat((table, table.new_zeros(_EXTRA_PE_ROWS, table.shape[1]))), persistent=False
        )

    @classmethod
    def from_official_config(
        cls,
        kwargs: Mapping[str, Any],
        grid: Sequence[int],
        pe_table: str | os.PathLike | np.ndarray | torch.Tensor | None = None,
        **overrides: Any,
    ) -> OAT:
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

    def decode(
        self,
        tgt_emb: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor,
        tgt_padding_mask: torch.Tensor,
        memory_key_padding_mask: torch.Tensor,
    ) -> torch.Tensor:
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

    def forward(
        self,
        src: torch.Tensor,
        trg: torch.Tensor,
        src_img: torch.Tensor,
        tgt_img: torch.Tensor,
        src_mask: torch.Tensor,
        tgt_mask: torch.Tensor,
        src_padding_mask: torch.Tensor,
        tgt_padding_mask: torch.Tensor,
        memory_key_padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The official signature: position triples ``src [N+1, B, 3]``, ``trg [T, B, 3]``; images
        ``[B, N+1|T, 150, 93, 3]``; masks as :class:`~attnzoo.vision.oat_inputs.OATBatch` holds them ->
        logits ``[T, B, N+2]``. The steps run in the official order (so training-mode dropout draws match it too)."""
        src_emb = self.embed_source(src, src_img)
        tgt_emb = self.embed_target(trg, self.embed_images(tgt_img))
        memory = self.encode(src_emb, src_mask, src_padding_mask)
        out = self.decode(tgt_emb, memory, tgt_mask, tgt_padding_mask, memory_key_padding_mask)
        return self.pointer_logits(memory, out)

    def forward_batch(self, batch: OATBatch) -> torch.Tensor:
        """Teacher-forced logits ``[T, B, N+2]`` of a :func:`~attnzoo.vision.oat_inputs.collate_oat` batch."""
        b = batch.to(self.pe.device)
        dtype = self.readout.weight.dtype
        return self(
            b.src,
            b.trg,
            b.src_img.to(dtype),
            b.tgt_img_input.to(dtype),
            b.src_mask,
            b.tgt_mask,
            b.src_padding_mask,
            b.tgt_padding_mask,
            b.memory_key_padding_mask,
        )

    @property
    def longest_decoding(self) -> int:
        """The most fixations one scanpath can have: the rows of the decoder's position table (5000 officially)."""
        return int(self.onedpositional_encoding.pos_embedding.shape[0])

    def generate(self, crops: Any, target: Any, max_len: int, **kwargs: Any) -> list[list[OATScanpath]]:
        """See :func:`attnzoo.vision.oat_decoding.generate`."""
        return generate(self, crops, target, max_len, **kwargs)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, num_objects={self.num_objects}, emb_size={self.emb_size}, CA_head={self.CA_head}"


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
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    if not tensors:
        raise WeightsError(
            f"not an OAT checkpoint: no tensors under 'state_dict'; keys: {sorted(map(str, checkpoint))[:10]}"
        )
    return tensors


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> OAT:
    if pretrained:
        raise WeightsError(
            f"no pretrained {name} weights exist (the authors released none): train the model, or load "
            f"your own checkpoint with attnzoo.create_model({name!r}, weights=PATH)"
        )
    cfg = default_cfgs[name]
    kwargs.setdefault("pe_table", cfg["pe_table"])
    model = OAT(grid=kwargs.pop("grid", cfg["grid"]), **kwargs)
    model.pretrained_cfg = dict(cfg)
    return model


def _cfg(grid: tuple[int, int], table: str, crop_style: str = "bgr", **kwargs: Any) -> dict[str, Any]:
    shelf = crop_style == "rgb_minmax"
    return {
        "grid": grid,
        "num_objects": grid[0] * grid[1],
        "pe_table": table,
        "input_size": (3, *CROP_SIZE),
        "crop_style": crop_style,
        "colour_order": "RGB" if shelf else "BGR",
        "pixel_range": (0, 1) if shelf else (0, 255),
        "interpolation": "bilinear (cv2 INTER_LINEAR)",
        "weights": None,
        "license": "no licence in the official repository",
        **kwargs,
    }


# No pretrained weights exist for any variant (the authors released none). The crops differ by
# dataset as in the official preprocessing: img_feature_amazon.py keeps cv2's BGR 0-255, while
# img_feature.py (the shelves) converts to RGB and min-max scales each crop to [0, 1].
default_cfgs: dict[str, dict[str, Any]] = {
    "oat_amazon": _cfg((6, 14), "amazon", dataset="Amazon book covers (STI-Dataset)"),
    "oat_yogurt": _cfg((3, 9), "yogurt", "rgb_minmax", dataset="OAT shelf data, yogurt (Q3)"),
    "oat_wine": _cfg((2, 11), "wine", "rgb_minmax", dataset="OAT shelf data, wine (Q1)"),
}


@register_model(family="oat", tasks=("scanpath",))
def oat_amazon(pretrained: bool = False, **kwargs: Any) -> OAT:
    """OAT for the Amazon book-cover collages: 6x14 = 84 objects, 18,300,985 params."""
    return _create("oat_amazon", pretrained, kwargs)


@register_model(family="oat", tasks=("scanpath",))
def oat_yogurt(pretrained: bool = False, **kwargs: Any) -> OAT:
    """OAT for the yogurt shelves (3x9 = 27 objects), with the sigma 2.5 position table."""
    return _create("oat_yogurt", pretrained, kwargs)


@register_model(family="oat", tasks=("scanpath",))
def oat_wine(pretrained: bool = False, **kwargs: Any) -> OAT:
    """OAT for the wine shelves (2x11 = 22 objects), with the sigma 2 table of 11 rows."""
    return _create("oat_wine", pretrained, kwargs)


@register_model(family="oat", tasks=("scanpath",))
def oat(pretrained: bool = False, **kwargs: Any) -> OAT:
    """``oat`` is :func:`oat_amazon`, the paper's main setting (``attnzoo eval``/``train`` read it as the
    variant of the shelf found in ``--data``)."""
    return _create("oat_amazon", pretrained, kwargs)
