"""Caption tokenizers: bytes and BPE, fixed context length, round trips, training from shards."""

import json
import tarfile

import pytest
import torch

from dist_contrast.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    train_bpe_from_shards,
)
from dist_contrast.data.write.digits import DIGIT_TEMPLATES
from dist_contrast.errors import DataError, UserError

from conftest import run_cli

TEXTS = ["a handwritten digit seven", "héllo wörld", "中文 ✓ 🙂", "", "  spaced  out \n"]


def _digits_captions(digits_dir) -> list[str]:
    captions = []
    for name in json.loads((digits_dir / "counts.json").read_text())["train"]["shards"]:
        with tarfile.open(digits_dir / name) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    return captions


@pytest.fixture(scope="module")
def bpe(digits_dir) -> BPETokenizer:
    tok, seen = train_bpe_from_shards(str(digits_dir / "train-*.tar"), vocab_size=320)
    assert seen == 1437  # every train sample's caption
    return tok


def _lengths(ids: torch.Tensor, eot: int) -> list[int]:
    return [row.tolist().index(eot) + 1 for row in ids]


def test_bytes_round_trip_layout_and_padding():
    tok = ByteTokenizer(context_length=48)
    ids = tok(TEXTS)
    assert ids.dtype == torch.int64 and ids.shape == (len(TEXTS), 48)
    assert tok.vocab_size == 259 and int(ids.max()) < tok.vocab_size
    assert tok.decode(ids) == TEXTS
    for text, row in zip(TEXTS, ids.tolist(), strict=True):
        raw = list(text.encode("utf-8"))
        assert row[: len(raw) + 2] == [tok.sot_id, *[b + 3 for b in raw], tok.eot_id]
        assert row[len(raw) + 2 :] == [tok.pad_id] * (48 - len(raw) - 2)
    assert tok.encode("one string").shape == (1, 48)
    assert tok.decode(ids[1]) == TEXTS[1]  # one row -> one string


def test_trim_drops_only_the_padding_after_the_last_end_of_text():
    tok = ByteTokenizer(context_length=16)
    ids = tok(["ab", "abcde", ""])  # lengths 4, 7, 2 through their end-of-text
    cut = tok.trim(ids)
    assert cut.shape == (3, 7) and cut.is_contiguous()
    assert torch.equal(cut, ids[:, :7])
    assert torch.equal(ids[:, 7:], torch.full((3, 9), tok.pad_id))  # only padding went
    assert tok.decode(cut) == ["ab", "abcde", ""]
    full = tok(["x" * 20])  # truncated: end-of-text at the last position
    assert tok.trim(full) is full
    by_hand = ids.clone()
    by_hand[1, 6] = 99  # a row without end-of-text pools at its last position: left whole
    assert tok.trim(by_hand) is by_hand
    assert tok.trim(ids[:0]).shape == (0, 16)


def test_truncation_keeps_end_of_text():
    tok = ByteTokenizer(context_length=8)
    ids = tok(["abcdefghijkl", "é" * 10])
    assert ids[:, 0].tolist() == [tok.sot_id] * 2 and ids[:, -1].tolist() == [tok.eot_id] * 2
    assert tok.pad_id not in ids.tolist()[0]
    assert tok.decode(ids[0]) == "abcdef"
    assert tok.decode(ids[1]) == "ééé"  # 6 bytes of 2-byte characters: three whole ones
    cut = ByteTokenizer(5)  # room for 3 bytes: one 2-byte character and half of the next
    assert cut.decode(cut("éé")[0]) == "é\ufffd"
    with pytest.raises(UserError, match="context length must be >= 2"):
        ByteTokenizer(1)


def test_bpe_from_digits_shards_round_trips_and_is_shorter(bpe, digits_dir):
    captions = sorted(set(_digits_captions(digits_dir)))
    assert len(captions) == 10 * len(DIGIT_TEMPLATES)  # every template x 10 digits
    ids = bpe(captions)
    assert ids.shape == (len(captions), 32) and ids.dtype == torch.int64
    assert bpe.decode(ids) == captions
    assert (bpe.pad_id, bpe.eot_id, bpe.sot_id) == (0, 1, 2)  # eot != 2: see TRAIN_ORDER
    assert 259 < bpe.vocab_size <= 320 and int(ids.max()) < bpe.vocab_size
    bpe_len = _lengths(ids, bpe.eot_id)
    byte_len = _lengths(ByteTokenizer(64)(captions), ByteTokenizer.eot_id)
    assert all(b < y for b, y in zip(bpe_len, byte_len, strict=True))
    assert sum(bpe_len) < 0.6 * sum(byte_len)  # 61 merges already save 40% of the tokens
    # text it never saw still round trips: byte-level, no unknown token
    assert bpe.decode(bpe(TEXTS)) == TEXTS


def test_bpe_saved_json_gives_identical_ids(bpe, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    bpe.save(path)
    loaded = build_tokenizer("bpe", str(path), context_length=32)
    captions = ["a handwritten digit four", *TEXTS]
    assert torch.equal(loaded(captions), bpe(captions))
    assert loaded.vocab_size == bpe.vocab_size
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    short = build_tokenizer("bpe", str(path), context_length=4)
    assert short("a handwritten digit four")[0, -1].item() == short.eot_id


def test_cli_tokenizer_train(bpe, digits_dir, tmp_path):
    out = tmp_path / "tok.json"
    proc = run_cli(
        "tokenizer", "train", "--shards", str(digits_dir / "train-*.tar"),
        "--vocab-size", "320", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "trained BPE on 1437 captions" in proc.stdout
    assert torch.equal(BPETokenizer.load(out)(TEXTS), bpe(TEXTS))  # training is deterministic

    proc = run_cli(
        "tokenizer", "train", "--shards", str(tmp_path / "none-*.tar"),
        "--vocab-size", "320", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dist-contrast: error: ")
    assert "matched no file" in lines[0] and "Traceback" not in proc.stderr


def test_factory_and_bad_input(tmp_path, digits_dir):
    assert isinstance(build_tokenizer("bytes", None, 16), ByteTokenizer)
    assert build_tokenizer("bytes", None, 16).context_length == 16
    with pytest.raises(UserError, match="unknown tokenizer 'gpt' .*bytes, bpe"):
        build_tokenizer("gpt", None, 16)
    with pytest.raises(UserError, match="'bpe' needs the path of a tokenizer.json"):
        build_tokenizer("bpe", None, 16)
    with pytest.raises(UserError, match="'bytes' takes no path"):
        build_tokenizer("bytes", "x.json", 16)
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer("bpe", str(tmp_path / "missing.json"), 16)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="is not a tokenizer.json"):
        build_tokenizer("bpe", str(tmp_path / "bad.json"), 16)
    with pytest.raises(UserError, match="vocab size must be > 259"):
        BPETokenizer.train(["abc"], vocab_size=100)
    empty = tmp_path / "empty-000000.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(DataError, match="no captions"):
        train_bpe_from_shards(str(empty), vocab_size=300)
    garbage = tmp_path / "garbage-000000.tar"
    garbage.write_bytes(b"not a tar file")
    with pytest.raises(DataError, match="cannot read captions of shard .*garbage-000000.tar"):
        train_bpe_from_shards(str(garbage), vocab_size=300)
