"""Writers of tiny copies of the published scanpath dataset layouts (CapMIT1003 SQLite, MIT1003 raw
.mat and pysaliency HDF5, Amazon/STI JSON + binary masks, OAT shelf .xlsx). Each returns what it
wrote so tests can check readers against it. Also: tiny models for the scanpath pipelines (a real
open_clip CLIP, OAT), a way to register them under their names for one test, and SPP computed by
hand (nltk's edit distance) to check the metric and the evaluation against."""

from __future__ import annotations

import json
import sqlite3
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int], seed: int = 0, fmt: str | None = None, block: int = 1) -> Path:
    """Random colours in ``block`` x ``block`` squares (large blocks keep a full-size screen's file small)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    cells = np.random.default_rng(seed).integers(0, 255, (-(-h // block), -(-w // block), 3), dtype=np.uint8)
    pixels = cells.repeat(block, 0).repeat(block, 1)[:h, :w]
    Image.fromarray(pixels).save(path, format=fmt)
    return path


# ---- CapMIT1003 --------------------------------------------------------------------------------
CAPMIT_IMAGES = {
    "img_a": ("i05june05_static_street_boston_p1010764.jpeg", (40, 30)),
    "img_b": ("i1000071957.jpeg", (30, 40)),
}
CAPMIT_CAPTIONS = [
    # obs_uid, usr_uid, start, caption, img_uid, clicks [(click_id, x, y, seconds after start)]
    (
        "obs1",
        "u1",
        "2022-05-03 10:15:00.000000",
        "a street with cars",
        "img_a",
        [(3, 5, 6, 1.5), (1, 10, 12, 0.25), (2, 20, 22, 0.75)],
    ),
    (
        "obs2",
        "u2",
        "2022-05-03 11:00:00.500000",
        "people walking on a road",
        "img_a",
        [(7, 30, 3, 2.0), (6, 1, 2, 1.0)],
    ),
    (
        "obs3",
        "u1",
        "2022-05-04 09:00:00.000000",
        "a red door",
        "img_b",
        [(9, 4, 4, 0.5)],
    ),
    ("obs4", "u3", "2022-05-04 09:30:00.000000", "a building", "img_b", []),
]


def write_capmit1003(
    root: Path,
    captions=CAPMIT_CAPTIONS,
    images=CAPMIT_IMAGES,
    time_format: str = "iso",
    drop: tuple[str, ...] = (),
    stimuli: bool = True,
) -> dict:
    """capmit1003.db with NevaClip's three tables + ALLSTIMULI/; ``drop`` leaves out "table" or "table.column"."""
    from datetime import datetime, timedelta, timezone

    root.mkdir(parents=True, exist_ok=True)
    db = root / "capmit1003.db"
    schema = {
        "captions": [
            ("obs_uid", "TEXT"),
            ("usr_uid", "TEXT"),
            ("start_time", "TIMESTAMP"),
            ("caption", "TEXT"),
            ("img_uid", "TEXT"),
        ],
        "images": [("img_uid", "TEXT"), ("img_path", "TEXT")],
        "clicks": [
            ("click_id", "INTEGER"),
            ("obs_uid", "TEXT"),
            ("x", "INTEGER"),
            ("y", "INTEGER"),
            ("click_time", "TIMESTAMP"),
        ],
    }

    def stamp(text: str, offset: float):
        t = datetime.fromisoformat(text) + timedelta(seconds=offset)
        if time_format == "iso":
            return t.isoformat(sep=" ")
        epoch = t.replace(tzinfo=timezone.utc).timestamp()
        return round(epoch * 1000) if time_format == "epoch_ms" else epoch

    rows = {
        "captions": [(o, u, stamp(s, 0), c, i) for o, u, s, c, i, _ in captions],
        "images": [(uid, name) for uid, (name, _) in images.items()],
        "clicks": [(cid, o, x, y, stamp(s, dt)) for o, _, s, _, _, clicks in captions for cid, x, y, dt in clicks],
    }
    cnx = sqlite3.connect(db)
    for table, cols in schema.items():
        if table in drop:
            continue
        kept = [(i, c, t) for i, (c, t) in enumerate(cols) if f"{table}.{c}" not in drop]
        cnx.execute(f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for _, c, t in kept)})")
        cnx.executemany(
            f"INSERT INTO {table} VALUES ({', '.join('?' * len(kept))})",
            [tuple(r[i] for i, _, _ in kept) for r in rows[table]],
        )
    cnx.commit()
    cnx.close()
    if stimuli:
        for seed, (name, size) in enumerate(images.values()):
            write_image(root / "ALLSTIMULI" / name, size, seed, fmt="JPEG")
    return {"db": db, "captions": captions, "images": images}


# ---- MIT1003 -----------------------------------------------------------------------------------
def step_trace(n: int, jumps: dict[int, tuple[float, float]], start: tuple[float, float]) -> np.ndarray:
    """A 240 Hz gaze trace at ``start`` that jumps to new positions: ``jumps[k]`` holds from 0-based sample k on."""
    trace = np.tile(np.asarray(start, dtype=np.float64), (n, 1))
    for k in sorted(jumps):
        trace[k:] = jumps[k]
    return trace


def write_mit1003_raw(
    root: Path,
    images: dict[str, tuple[int, int]],
    traces: dict[tuple[str, str], np.ndarray],
    variable_names: dict[str, str] | None = None,
) -> dict:
    """ALLSTIMULI/<name>.jpeg + DATA/<subject>/<stem>.mat holding struct ``<stem[:63]>.DATA(1).eyeData``
    (DATA is a 1x2 struct array; DATA(2) holds a decoy trace)."""
    from scipy.io import savemat

    for seed, (name, size) in enumerate(images.items()):
        write_image(root / "ALLSTIMULI" / name, size, seed, fmt="JPEG")
    for (name, subject), eye in traces.items():
        stem = Path(name).stem
        var = (variable_names or {}).get(name, stem[:63])
        data = np.zeros((1, 2), dtype=[("eyeData", object), ("name", object)])
        data[0, 0] = (np.asarray(eye, dtype=np.float64), stem)
        data[0, 1] = (np.full((5, 2), -999.0), "decoy")
        out = root / "DATA" / subject / f"{stem}.mat"
        out.parent.mkdir(parents=True, exist_ok=True)
        savemat(out, {var: {"DATA": data, "user": subject}})
    return {"images": images, "traces": traces}


def write_mit1003_pysaliency(
    folder: Path,
    images: dict[str, tuple[int, int]],
    scanpaths: list[dict],
    kind: str = "ScanpathFixations",
) -> dict:
    """pysaliency's cache: stimuli.hdf5 (FileStimuli v2.1, copied images under stimuli/) and fixations.hdf5
    (ScanpathFixations v1.0 or FixationTrains v1.3). ``scanpaths``: dicts n, subject (index), xs, ys, ts, durations."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    names = list(images)
    for seed, (name, size) in enumerate(images.items()):
        write_image(folder / "stimuli" / name, size, seed, fmt="JPEG")
    with h5py.File(folder / "stimuli.hdf5", "w") as f:
        f.attrs["type"] = np.bytes_("FileStimuli")
        f.attrs["version"] = np.bytes_("2.1")
        f.create_dataset(
            "filenames",
            data=np.array([f"stimuli/{n}".encode() for n in names]),
            dtype=h5py.special_dtype(vlen=str),
        )
        shapes = f.create_dataset("shapes", (len(names),), dtype=h5py.special_dtype(vlen=np.dtype("int64")))
        for i, n in enumerate(names):
            w, h = images[n]
            shapes[i] = np.array([h, w, 3])
        f.attrs["__attributes__"] = np.bytes_(json.dumps([]))
        f.attrs["size"] = len(names)

    lengths = np.array([len(s["xs"]) for s in scanpaths])
    width = max(1, int(lengths.max()))

    def padded(key):
        out = np.full((len(scanpaths), width), np.nan)
        for i, s in enumerate(scanpaths):
            out[i, : len(s[key])] = s[key]
        return out

    ns = np.array([s["n"] for s in scanpaths])
    subjects = np.array([s["subject"] for s in scanpaths])
    with h5py.File(folder / "fixations.hdf5", "w") as f:
        if kind == "ScanpathFixations":
            f.attrs["type"] = np.bytes_("ScanpathFixations")
            f.attrs["version"] = np.bytes_("1.0")
            g = f.create_group("scanpaths")
            g.attrs["type"] = np.bytes_("Scanpaths")
            g.attrs["version"] = np.bytes_("1.0")
            g.create_dataset("xs", data=padded("xs"))
            g.create_dataset("ys", data=padded("ys"))
            g.create_dataset("n", data=ns)
            g.create_dataset("length", data=lengths)
            sa = g.create_group("scanpath_attributes")
            sa.create_dataset("subject", data=subjects)
            sa.attrs["__attributes__"] = np.bytes_(json.dumps(["subject"]))
            fa = g.create_group("fixation_attributes")
            fa.create_dataset("durations", data=padded("durations"))
            fa.create_dataset("ts", data=padded("ts"))
            fa.attrs["__attributes__"] = np.bytes_(json.dumps(["durations", "ts"]))
            g.attrs["attribute_mapping"] = np.bytes_(json.dumps({"durations": "duration", "ts": "t"}))
        else:
            f.attrs["type"] = np.bytes_("FixationTrains")
            f.attrs["version"] = np.bytes_("1.3")
            for key, data in (
                ("train_xs", padded("xs")),
                ("train_ys", padded("ys")),
                ("train_ts", padded("ts")),
                ("train_ns", ns),
                ("train_subjects", subjects),
                ("train_lengths", lengths),
            ):
                f.create_dataset(key, data=data)
            f.attrs["__attributes__"] = np.bytes_(json.dumps([]))
            f.attrs["scanpath_attribute_mapping"] = np.bytes_(json.dumps({"durations": "duration"}))
            sa = f.create_group("scanpath_attributes")
            sa.attrs["__attributes__"] = np.bytes_(json.dumps([]))
            sfa = f.create_group("scanpath_fixation_attributes")
            sfa.create_dataset("durations", data=padded("durations"))
            sfa.attrs["__attributes__"] = np.bytes_(json.dumps(["durations"]))
    return {"images": images, "scanpaths": scanpaths}


# ---- Amazon covers -----------------------------------------------------------------------------
AMAZON_SIZE = (
    140,
    60,
)  # width, height of the tiny collages: 14 x 6 covers of 10 x 10 px cells


def amazon_cover_boxes(width: int = 140, height: int = 60) -> list[tuple[int, int, int, int]]:
    """Drawn covers: 8 x 7 px inside each 10 x 10 cell, with a row-dependent jitter of y (< 10 px snap)."""
    boxes = []
    for r in range(6):
        for c in range(14):
            x0, y0 = c * 10 + 1, r * 10 + 1 + (c % 2)  # odd columns sit one pixel lower
            boxes.append((x0, y0, x0 + 8, y0 + 7))
    return boxes


def draw_mask(size: tuple[int, int], boxes, value: int = 255) -> np.ndarray:
    """A binary mask (white objects on black) with the given (x0, y0, x1, y1) rectangles, x1/y1 exclusive."""
    w, h = size
    mask = np.zeros((h, w), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = value
    return mask


def write_amazon(
    root: Path,
    layout: str = "sti",
    entries: dict | None = None,
    masks: bool | None = None,
) -> dict:
    """STI (``AmazonCovers/Amazon.json`` + images/) or OAT (``amazon_data/amazon_data.json`` + images/,
    binarymask/14x6-<img>, target/) layout. Returns the json dict, the folder and the drawn boxes."""
    folder = root / ("AmazonCovers" if layout == "sti" else "amazon_data")
    folder.mkdir(parents=True, exist_ok=True)
    w, h = AMAZON_SIZE
    if entries is None:
        entries = {
            "1.jpg": {
                "fixations": {
                    "1": [[5, 5], [25, 14], [129, 55]],
                    "2": [[40, 20]],
                    "3": [[10, 9], [11, 9], [10, 30], [135, 2]],
                },
                "ground_truth": [{"xmin": 21, "xmax": 29, "ymin": 12, "ymax": 19}],
                "size": {"height": h, "width": w},
                "target": "target_2.jpg",
            },
            "2.jpg": {
                "fixations": {"1": [[75, 45]], "2": [[9.5, 8.5], [70, 50]]},
                "ground_truth": [{"xmin": 70, "xmax": 80, "ymin": 40, "ymax": 50}],
                "size": {"height": h, "width": w},
                "target": "target_0.jpg",
            },
        }
    (folder / ("Amazon.json" if layout == "sti" else "amazon_data.json")).write_text(json.dumps(entries))
    for seed, name in enumerate(entries):
        write_image(folder / "images" / name, (w, h), seed, fmt="JPEG")
    boxes = amazon_cover_boxes(w, h)
    if masks if masks is not None else layout == "oat":
        for name in entries:
            path = folder / "binarymask" / f"14x6-{name}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(draw_mask((w, h), boxes)).convert("RGB").save(path, format="PNG")  # lossless
    if layout == "oat":
        for name in {e["target"] for e in entries.values()}:
            write_image(folder / "target" / name, (8, 7), 9, fmt="JPEG")
    return {"folder": folder, "entries": entries, "boxes": boxes}


# ---- OAT shelves -------------------------------------------------------------------------------
def write_xlsx(path: Path, header: list[str], rows: list[list]) -> Path:
    """A minimal .xlsx (one sheet; strings shared, numbers as numbers), as Excel/openpyxl write them."""
    strings: list[str] = []

    def col(i: int) -> str:
        s = ""
        i += 1
        while i:
            i, rem = divmod(i - 1, 26)
            s = chr(65 + rem) + s
        return s

    def cell(r: int, c: int, v) -> str:
        ref = f"{col(c)}{r}"
        if v is None:  # a blank cell: Excel writes nothing for it
            return ""
        if isinstance(v, str):
            if v not in strings:
                strings.append(v)
            return f'<c r="{ref}" t="s"><v>{strings.index(v)}</v></c>'
        return f'<c r="{ref}"><v>{v}</v></c>'

    body = "".join(
        f'<row r="{r + 1}">' + "".join(cell(r + 1, c, v) for c, v in enumerate(row)) + "</row>"
        for r, row in enumerate([header, *rows])
    )
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    sheet = f'<?xml version="1.0" encoding="UTF-8"?><worksheet {ns}><sheetData>{body}</sheetData></worksheet>'
    sst = (
        f'<?xml version="1.0" encoding="UTF-8"?><sst {ns} count="{len(strings)}">'
        + "".join(f"<si><t>{escape(s)}</t></si>" for s in strings)
        + "</sst>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>',
        )
        z.writestr(
            "xl/workbook.xml",
            f'<?xml version="1.0"?><workbook {ns}><sheets><sheet name="Sheet1" sheetId="1"/></sheets></workbook>',
        )
        z.writestr("xl/worksheets/sheet1.xml", sheet)
        z.writestr("xl/sharedStrings.xml", sst)
    return path


SHELF_HEADER = [
    "ID",
    "Sub_ID",
    "Task_ID",
    "Target",
    "Question",
    "T_Package",
    "Choice",
    "X",
    "Y",
]


def write_oat_shelf(
    root: Path,
    task: str = "yogurt",
    scanpaths: list[dict] | None = None,
    fmt: str = "xlsx",
    image_size: tuple[int, int] = (168, 105),
) -> dict:
    """OAT's gaze file (one row per fixation) + img/Question/<Q>.png + img/Target/<T>.png (shelf images
    of ``image_size``; the task's boxes fit the screen's 1680 x 1050 only)."""
    prefix, stem = ("Q3", "time_Q3_mousedel_new") if task == "yogurt" else ("Q1", "time_Q1_mousedel_new")
    if scanpaths is None:
        scanpaths = [
            {
                "ID": 11,
                "Sub_ID": 4,
                "Target": f"T{prefix[1]}_1",
                "Question": f"{prefix}_21",
                "T_Package": 5,
                "Choice": [1, 2, 5],
                "X": [90.0, 280.5, 800.0],
                "Y": [300.0, 310.0, 320.0],
            },
            {
                "ID": 12,
                "Sub_ID": 5,
                "Target": f"T{prefix[1]}_2",
                "Question": f"{prefix}_7",
                "T_Package": 1,
                "Choice": [3, 1],
                "X": [400.0, 50.0],
                "Y": [600.0, 700.0],
            },
        ]
    rows = []
    for s in scanpaths:
        for choice, x, y in zip(s["Choice"], s["X"], s["Y"]):
            rows.append(
                [
                    s["ID"],
                    s["Sub_ID"],
                    1,
                    s["Target"],
                    s["Question"],
                    s["T_Package"],
                    choice,
                    x,
                    y,
                ]
            )
    if fmt == "xlsx":
        path = write_xlsx(root / f"{stem}.xlsx", SHELF_HEADER, rows)
    else:
        import csv

        path = root / f"{stem}.csv"
        root.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows([SHELF_HEADER, *rows])
    for seed, s in enumerate(scanpaths):
        write_image(
            root / "img" / "Question" / f"{s['Question']}.png",
            image_size,
            seed,
            fmt="PNG",
            block=1 if image_size == (168, 105) else 30,
        )
        write_image(root / "img" / "Target" / f"{s['Target']}.png", (10, 20), seed, fmt="PNG")
    return {"path": path, "scanpaths": scanpaths}


# ---- tiny models -------------------------------------------------------------------------------
def make_sensitive_(tower, seed: int, image_size: int):
    """Make a random open_clip ModifiedResNet tower's output depend on the image, as the parity fixture's:
    He-initialised convolutions and batch-norm statistics measured on smooth random images (with open_clip's
    default initialisation the output barely changes with the image, and the search follows rounding noise)."""
    import math

    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed + 100)
    for module in tower.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = torch.randn(module.weight.shape, generator=gen) * math.sqrt(
                2.0 / module.weight[0].numel()
            )
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    tower.train()
    with torch.no_grad():
        for _ in range(2):
            tower(F.avg_pool2d(torch.randn(8, 3, image_size, image_size, generator=gen), 5, 1, 2))
    tower.eval()
    return tower


TINY_OPEN_CLIP_NAME = "attnzoo-test-tiny-rn"


def register_tiny_open_clip(monkeypatch) -> str:
    """A tiny RN CLIP registered under an open_clip model name for one test (random init only: no weights
    exist); returns the name."""
    import open_clip.factory

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_OPEN_CLIP_NAME, cfg)
    return TINY_OPEN_CLIP_NAME


def tiny_clip(seed: int = 0, image_size: int = 224, embed_dim: int = 64):
    """A real open_clip CLIP (ModifiedResNet vision tower, transformer text tower, OpenAI's BPE
    tokenizer that ships with open_clip), small enough for the CPU, input-sensitive (:func:`make_sensitive_`)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg={"image_size": image_size, "layers": [1, 1, 1, 1], "width": 8},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    make_sensitive_(model.visual, seed, image_size)
    return model.eval()


def tiny_nevaclip(seed: int = 0, image_size: int = 224):
    import open_clip

    from attnzoo.multimodal.nevaclip import NevaClip

    return NevaClip(model=tiny_clip(seed, image_size), tokenizer=open_clip.get_tokenizer("RN50"))


OAT_SMALL = {
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "emb_size": 64,
    "nhead": 2,
    "dim_feedforward": 32,
    "CA_d_k": 16,
}


def tiny_oat(grid: tuple[int, int] = (2, 3)):
    """A tiny OAT on a ``grid`` shelf with Amazon's position table."""
    from attnzoo.vision.oat import OAT

    return OAT(grid=grid, pe_table="amazon", seed=0, **OAT_SMALL).eval()


def use_model(monkeypatch, name: str, builder) -> None:
    """The registered model ``name`` is built by ``builder(**kwargs)`` for one test (the real builder would
    load a real CLIP, or build a full-size OAT)."""
    import attnzoo.registry
    from attnzoo.factory import load_families

    load_families()
    entry = attnzoo.registry.get_model_entry(name)
    monkeypatch.setitem(
        attnzoo.registry._MODELS,
        name,
        attnzoo.registry.ModelEntry(name, builder, entry.family, entry.tasks, entry.own_weights),
    )


# ---- SPP by hand ---------------------------------------------------------------------------------
def spp_by_hand(model_xy, humans_xy, size, k: int = 3, grid: int = 4) -> float:
    """NevaClip's scanpath plausibility written out: FixaTons' letters (cells of ``width // 4`` x
    ``height // 4`` px, coordinates truncated, points past the last cell clipped into it), each window of
    ``k`` model letters matched to its nearest window of human letters by nltk's edit distance with
    transpositions, / k, averaged; 1 minus that, averaged over the humans with at least ``k`` fixations."""
    from nltk import edit_distance

    def letters(xy):
        step_x, step_y = int(size[0]) // grid, int(size[1]) // grid
        out = ""
        for x, y in np.asarray(xy, dtype=float):
            col, row = min(max(int(x) // step_x, 0), grid - 1), min(max(int(y) // step_y, 0), grid - 1)
            out += chr(ord("a") + row * grid + col)
        return out

    model = letters(model_xy)
    scores = []
    for human in humans_xy:
        h = letters(human)
        if len(h) < k or len(model) < k:
            continue
        windows = [h[i : i + k] for i in range(len(h) - k + 1)]
        nearest = [
            min(edit_distance(model[i : i + k], w, transpositions=True) for w in windows) / k
            for i in range(len(model) - k + 1)
        ]
        scores.append(1 - sum(nearest) / len(nearest))
    return sum(scores) / len(scores) if scores else float("nan")
