"""Eval sets as people keep them: CLIP_benchmark webdataset folders, class folders, shards."""

import io
import tarfile

import pytest
from PIL import Image

from dist_contrast.data.decode import decode_or_count
from dist_contrast.data.evalsets import Unit, open_eval_set, unit_samples
from dist_contrast.data.tario import Faults
from dist_contrast.errors import DataError

MAX_PIXELS = 10_000


def _image(seed: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (seed * 37 % 256, seed * 11 % 256, 90)).save(buf, fmt)
    return buf.getvalue()


def _tar(path, samples):
    """samples: (key, {ext: bytes}) in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _decode_all(es, faults):
    out = []
    for unit in es.units:
        for sample in unit_samples(unit, faults):
            d = decode_or_count(sample, faults, MAX_PIXELS, require_caption=False)
            if d is not None:
                out.append(d)
    return out


def _clip_benchmark_set(root, nshards=True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("tench\ngoldfish\ngreat white shark\n")
    (root / "zeroshot_classification_templates.txt").write_text(
        "a photo of a {c}.\n\na sketch of the {c}.\n"
    )
    labels = {}
    for s in (0, 1, 10):  # written out of natural order on purpose
        labels[s] = [(s + i) % 3 for i in range(4)]
        _tar(
            root / "test" / f"{s}.tar",
            [
                (f"s{s:03d}{i:04d}", {"webp": _image(s + i, "WEBP"), "cls": str(lab).encode()})
                for i, lab in enumerate(labels[s])
            ],
        )
    if nshards:
        (root / "test" / "nshards.txt").write_text("3\n")
    return [lab for s in (0, 1, 10) for lab in labels[s]]


@pytest.mark.parametrize("nshards", [True, False])
def test_clip_benchmark_layout(tmp_path, nshards):
    written = _clip_benchmark_set(tmp_path, nshards=nshards)
    if nshards:  # clip_benchmark reads {0..n-1}.tar, n from nshards.txt
        (tmp_path / "test" / "10.tar").rename(tmp_path / "test" / "2.tar")
    es = open_eval_set(str(tmp_path))
    last = "2.tar" if nshards else "10.tar"
    assert [u.url for u in es.units] == [
        str(tmp_path / "test" / n) for n in ("0.tar", "1.tar", last)
    ]
    assert all(u.kind == "shard" for u in es.units)
    assert es.classnames == ["tench", "goldfish", "great white shark"]
    assert es.templates == ["a photo of a {}.", "a sketch of the {}."]
    faults = Faults()
    decoded = _decode_all(es, faults)
    assert [d.label for d in decoded] == written
    assert faults.total() == 0
    # the split folder given itself: the same shards, names from the set's root
    split = open_eval_set(str(tmp_path / "test"))
    assert split.units == es.units
    assert (split.classnames, split.templates) == (
        (es.classnames, es.templates) if nshards else (None, None)
    )


def _class_folders(root):
    for k, name in enumerate(("cat", "golden_retriever", "zebra")):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (5, 4), (k * 80, i * 40, 0)).save(root / name / f"im{i}.png")
    (root / "golden_retriever" / "im3.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "zebra" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()


def test_class_folders(tmp_path):
    _class_folders(tmp_path)
    es = open_eval_set(str(tmp_path))
    assert es.classnames == ["cat", "golden retriever", "zebra"]
    assert es.templates is None
    assert len(es.units) == 1 and es.units[0].kind == "files"
    files = es.units[0].files
    assert len(files) == 15
    assert files[:6] == tuple((str(tmp_path / "cat" / f"im{i}.png"), 0) for i in range(5)) + (
        (str(tmp_path / "golden_retriever" / "im0.png"), 1),
    )
    faults = Faults()
    decoded = _decode_all(es, faults)
    assert len(decoded) == 14
    assert [d.label for d in decoded] == [0] * 5 + [1] * 4 + [2] * 5
    assert faults.counts["corrupt_image"] == 1 and faults.total() == 1


def test_class_folders_units_and_names_file(tmp_path, monkeypatch):
    monkeypatch.setattr("dist_contrast.data.evalsets.FILES_PER_UNIT", 4)
    _class_folders(tmp_path)
    (tmp_path / "classnames.txt").write_text("kitten\ndog\nstriped horse\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("itap of a {c}.\n")
    es = open_eval_set(str(tmp_path))
    assert [len(u.files) for u in es.units] == [4, 4, 4, 3]
    assert es.classnames == ["kitten", "dog", "striped horse"]
    assert es.templates == ["itap of a {}."]


def test_unreadable_file_is_counted(tmp_path):
    unit = Unit("files", files=((str(tmp_path / "c" / "gone.jpg"), 0),))
    faults = Faults()
    assert list(unit_samples(unit, faults)) == []
    assert faults.counts["missing_image"] == 1


def test_shard_pattern_with_classnames_beside(tmp_path):
    for s in range(3):
        _tar(
            tmp_path / f"val-{s:06d}.tar",
            [(f"{s}{i:05d}", {"jpg": _image(i, "JPEG"), "cls": str(i).encode()}) for i in range(2)],
        )
    (tmp_path / "classnames.txt").write_text("a\nb\n")
    es = open_eval_set(str(tmp_path / "val-{000000..000002}.tar"))
    assert [u.url for u in es.units] == [str(tmp_path / f"val-{s:06d}.tar") for s in range(3)]
    assert es.classnames == ["a", "b"] and es.templates is None
    faults = Faults()
    assert [d.label for d in _decode_all(es, faults)] == [0, 1] * 3
    # a glob, and shards without names beside them
    (tmp_path / "classnames.txt").unlink()
    es = open_eval_set(str(tmp_path / "val-*.tar"))
    assert len(es.units) == 3 and es.classnames is None


def _one_line_data_error(spec, *needles, **kw):
    with pytest.raises(DataError) as info:
        open_eval_set(spec, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_errors(tmp_path):
    _one_line_data_error(str(tmp_path / "nope" / "x-*.tar"), "matches nothing", "nope")

    clip = tmp_path / "clip"
    _clip_benchmark_set(clip, nshards=False)
    _tar(clip / "train" / "0.tar", [("k", {"cls": b"0"})])
    _one_line_data_error(str(clip), "'validation'", "test, train", split="validation")

    (clip / "classnames.txt").write_text("\n\n")
    _one_line_data_error(str(clip), "classnames.txt", "empty")

    empty = tmp_path / "folders"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "readme.txt").write_text("no images here")
    _one_line_data_error(str(empty), "no image", str(empty))

    short = tmp_path / "short"
    _clip_benchmark_set(short)  # nshards.txt says 3: 0, 1 and 2.tar; 10.tar is not one of them
    _one_line_data_error(str(short), "2.tar", "nshards.txt")
