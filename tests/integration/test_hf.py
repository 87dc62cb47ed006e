"""The downstream path through Hugging Face ``transformers`` (the real library, a test extra):
``export --format hf`` of a ViT CLIP run loaded by ``CLIPModel`` / ``AutoTokenizer`` with equal
features and ids; a transformers-only script reproducing ``eval.json``'s zero-shot figure; a
random ``CLIPModel`` as ``model.init_from`` and a LiT run from it; a ViT SimCLR encoder as
``ViTModel``; the one-line refusal of a GroupNorm ResNet; a run directory moved elsewhere.
SigLIP's layouts (``SiglipModel``): test_hf_siglip.py, which shares this file's helpers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from dist_contrast.data.tokenizer import BPETokenizer
from dist_contrast.export import load_clip
from dist_contrast.export.write import trained_method
from dist_contrast.train.runs import load_run

from conftest import ROOT, cli_env, run_cli

transformers = pytest.importorskip("transformers")

QUIET = ["logging.wandb=false", "logging.progress=false", "logging.plots=false"]
VIT_SIZE = ["model.vit_width=96", "model.vit_depth=2", "model.vit_heads=3", "model.vit_mlp_ratio=2"]
CAPTIONS = ["a drawing of the number seven", "an image of a three", "handwriting of a one " * 9]
BLOCK_DIST_CONTRAST = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dist_contrast":
            raise ImportError("dist_contrast is blocked in this test")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _train(tmp, config: str, *overrides: str, name: str) -> None:
    proc = run_cli(
        "train", "--config", str(ROOT / config), f"run.name={name}", *QUIET, *overrides, cwd=tmp
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def exported_short_run(tmp, config: str, *overrides: str, name: str):
    """``config`` trained 4 steps of 32 (ZeRO-0, one process) in ``tmp``, evaluated and
    exported with --format hf to ``tmp / "hf"``: (``tmp``, the run directory)."""
    short = ["train.steps=4", "train.batch_size=32", "train.warmup_steps=0"]
    _train(tmp, config, *short, "deepspeed.zero_stage=0", *overrides, name=name)
    run = tmp / "runs" / name
    assert run_cli("eval", "--run", str(run), "--brief", cwd=tmp).returncode == 0
    proc = run_cli("export", "--run", str(run), "--out", str(tmp / "hf"), "--format", "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, run


@pytest.fixture(scope="module")
def vit_clip(tmp_path_factory, digits_dir, digits_tokenizer):
    """A 4-step ViT CLIP run trained from its own folder with relative data and tokenizer
    paths (as a user's), evaluated, and exported with --format hf. The ViT is vit_nano resized
    by the config (96 wide, 2 blocks of 3 heads, MLP ratio 2): the export reads the size off
    the model."""
    tmp = tmp_path_factory.mktemp("vit_clip")
    (tmp / "digits").symlink_to(digits_dir)
    (tmp / "tok").mkdir()
    shutil.copy(digits_tokenizer, tmp / "tok" / "tokenizer.json")
    return exported_short_run(
        tmp,
        "configs/clip_vit_digits.yaml",
        "data.train_shards=digits/train-*.tar",
        "data.val_shards=digits/val-*.tar",
        "data.tokenizer_path=tok/tokenizer.json",
        "method.queue_size=64",
        *VIT_SIZE,
        name="vit",
    )


def test_clip_export_loads_in_transformers_with_equal_features(vit_clip, digits_tokenizer):
    tmp, run = vit_clip
    model = transformers.CLIPModel.from_pretrained(tmp / "hf").eval()
    vision = model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (96, 2, 3)
    assert vision.intermediate_size == 192
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp / "hf")
    ours_tok = BPETokenizer.load(digits_tokenizer, 24)
    ids = hf_tok(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(ids["input_ids"], ours_tok(CAPTIONS))  # the long one truncated alike
    cfg, step_dir = load_run(run)
    method = trained_method(cfg, step_dir)
    pixels = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_image = model.get_image_features(pixel_values=pixels).pooler_output
        hf_text = model.get_text_features(**ids).pooler_output
        image, text = method.image(pixels), method.text(ours_tok(CAPTIONS))
    assert (hf_image - image).abs().max() < 1e-5
    assert (hf_text - text).abs().max() < 1e-5
    assert abs(float(model.logit_scale.detach().exp()) - method.logit_scale()) < 1e-4
    card = (tmp / "hf" / "README.md").read_text()  # every eval.json figure, with baseline
    for label in ("zero-shot top-1", "image->text R@10", "text->image R@1", "kNN", "linear"):
        assert label in card, label
    assert "CLIPModel.from_pretrained" in card


def without_dist_contrast(script, *args, cwd) -> subprocess.CompletedProcess:
    """``python script args`` in a process whose imports of ``dist_contrast`` fail."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK_DIST_CONTRAST, str(script), *map(str, args)],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_zero_shot_script(tmp, run, digits_dir) -> None:
    """examples/hf_zero_shot.py (AutoModel: a CLIPModel or a SiglipModel), run without
    dist_contrast on the export at ``tmp / "hf"``, gives ``run``'s eval.json zero-shot top-1."""
    script = ROOT / "examples" / "hf_zero_shot.py"
    shards = digits_dir / "val-*.tar"
    proc = without_dist_contrast(script, "--model", tmp / "hf", "--shards", shards, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = json.loads((run / "eval.json").read_text())
    assert got["samples"] == want["val_samples"]
    assert got["zeroshot_top1"] == want["zeroshot_top1"]


def test_transformers_only_script_reproduces_zero_shot(vit_clip, digits_dir):
    check_zero_shot_script(*vit_clip, digits_dir)


def test_native_load_clip_gives_joint_space_logits(vit_clip):
    tmp, run = vit_clip
    proc = run_cli("export", "--run", str(run), "--out", str(tmp / "native"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    clip = load_clip(tmp / "native")
    model = transformers.CLIPModel.from_pretrained(tmp / "hf").eval()
    pixels = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    image, text = clip.encode_image(pixels), clip.encode_text(CAPTIONS)
    assert torch.allclose(image.norm(dim=1), torch.ones(3)) and text.shape == (3, image.shape[1])
    tokens = transformers.AutoTokenizer.from_pretrained(tmp / "hf")(
        CAPTIONS, padding="max_length", truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(pixel_values=(pixels - 0.5) / 0.5, **tokens)
    ours = clip.logit_scale * image @ text.T
    assert (out.logits_per_image - ours).abs().max() < 1e-4


def test_moved_run_exports_and_evaluates_alike(vit_clip, tmp_path):
    tmp, run = vit_clip
    moved = tmp_path / "elsewhere" / "vit"
    shutil.copytree(run, moved)
    tokenizer = tmp / "tok" / "tokenizer.json"
    hidden = tmp / "tok" / "hidden.json"
    tokenizer.rename(hidden)  # the file the config named is gone; the run holds a copy
    try:
        other_cwd = tmp_path / "cwd"
        other_cwd.mkdir()
        (moved / "eval.json").unlink()
        proc = run_cli("eval", "--run", str(moved), "--brief", cwd=other_cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = run_cli("export", "--run", str(moved), "--out", "exp", cwd=other_cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        hidden.rename(tokenizer)
    before, after = (json.loads((r / "eval.json").read_text()) for r in (run, moved))
    assert after == before
    assert load_clip(other_cwd / "exp").encode_text(CAPTIONS).shape[0] == 3


def _tiny_clip_config(tok: BPETokenizer) -> transformers.CLIPConfig:
    """A CLIPModel of transformers' own defaults (quick_gelu, eps 1e-5) at our sizes."""
    text = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=256)
    text.update(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24)
    text.update(pad_token_id=tok.pad_id, bos_token_id=tok.sot_id, eos_token_id=tok.eot_id)
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4)
    vision.update(num_attention_heads=4, image_size=16, patch_size=4, num_channels=1)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def test_init_from_hf_clip_then_lit(tmp_path, digits_dir, digits_tokenizer):
    from dist_contrast.config import load_config
    from dist_contrast.eval.run import starting_point
    from dist_contrast.train.setup import initial_method

    tok = BPETokenizer.load(digits_tokenizer, 24)
    torch.manual_seed(3)
    hf_model = transformers.CLIPModel(_tiny_clip_config(tok)).eval()
    hf_model.save_pretrained(tmp_path / "hf_init")
    overrides = [
        f"model.init_from=hf:{tmp_path / 'hf_init'}",
        "model.activation=quick_gelu",
        "model.norm_eps=1e-5",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
        f"data.tokenizer_path={digits_tokenizer}",
        f"run.dir={tmp_path}",
    ]
    cfg = load_config(ROOT / "configs/clip_vit_digits.yaml", overrides)
    method = initial_method(cfg).eval()
    pixels = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (
            method.image(pixels) - hf_model.get_image_features(pixel_values=pixels).pooler_output
        ).abs().max() < 1e-5
        ids = tok(CAPTIONS)
        assert (
            method.text(ids) - hf_model.get_text_features(input_ids=ids).pooler_output
        ).abs().max() < 1e-5
    assert abs(method.logit_scale() - float(hf_model.logit_scale.detach().exp())) < 1e-4
    # LiT: 20 steps with the image tower locked (ZeRO-2, one process)
    lit = [*overrides, "model.lock_image=true", "train.steps=20", "train.batch_size=32"]
    lit += ["train.warmup_steps=0", "method.queue_size=64", "checkpoint.every=20"]
    _train(tmp_path, "configs/clip_vit_digits.yaml", *lit, name="lit")
    cfg_run, step_dir = load_run(tmp_path / "lit")
    trained = trained_method(cfg_run, step_dir)
    for name in ("image", "text"):
        before, after = getattr(method, name).state_dict(), getattr(trained, name).state_dict()
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == (name == "image"), name  # image tower bit-identical, text tower moved
    assert trained.logit_scale() != method.logit_scale()
    start, what = starting_point(cfg_run)  # eval's baseline: the init_from weights
    assert what == f"model.init_from hf:{tmp_path / 'hf_init'}"
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in start.state_dict().items())


def test_init_from_refuses_a_mismatch_in_one_line(tmp_path, digits_dir, digits_tokenizer):
    tok = BPETokenizer.load(digits_tokenizer, 24)
    transformers.CLIPModel(_tiny_clip_config(tok)).save_pretrained(tmp_path / "hf_init")
    proc = run_cli(
        "train",
        "--config",
        str(ROOT / "configs/clip_vit_digits.yaml"),
        f"model.init_from=hf:{tmp_path / 'hf_init'}",
        "model.norm_eps=1e-5",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
        f"data.tokenizer_path={digits_tokenizer}",
        f"run.dir={tmp_path}",
        *QUIET,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "hidden_act is 'quick_gelu'" in last and "model.activation=quick_gelu" in last, last


def test_init_from_refuses_other_attention_heads(tmp_path, digits_dir, digits_tokenizer):
    """The heads do not show in the shapes: a CLIPModel of 4 heads into a ViT (or text tower)
    of 2 is refused, naming the key to set."""
    from dist_contrast.config import load_config
    from dist_contrast.errors import UserError
    from dist_contrast.train.setup import initial_method

    tok = BPETokenizer.load(digits_tokenizer, 24)
    transformers.CLIPModel(_tiny_clip_config(tok)).save_pretrained(tmp_path / "hf_init")
    base = [
        f"model.init_from=hf:{tmp_path / 'hf_init'}",
        "model.activation=quick_gelu",
        "model.norm_eps=1e-5",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.tokenizer_path={digits_tokenizer}",
        f"run.dir={tmp_path}",
    ]
    for key in ("model.vit_heads", "text.heads"):
        cfg = load_config(ROOT / "configs/clip_vit_digits.yaml", [*base, f"{key}=2"])
        with pytest.raises(UserError, match=rf"num_attention_heads is 4, .* set {key}=4"):
            initial_method(cfg)


def test_vit_simclr_exports_as_vit_model_and_groupnorm_resnet_is_refused(tmp_path, digits_dir):
    data = [
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
    ]
    short = ["train.steps=1", "train.batch_size=16", "deepspeed.zero_stage=0", *data]
    _train(tmp_path, "configs/simclr_digits.yaml", *short, "model.encoder=vit_nano", name="vit")
    _train(tmp_path, "configs/simclr_digits.yaml", *short, name="resnet")
    run = tmp_path / "runs" / "vit"
    proc = run_cli("export", "--run", str(run), "--out", str(tmp_path / "hf"), "--format", "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    cfg, step_dir = load_run(run)
    encoder = trained_method(cfg, step_dir).encoder
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(pixel_values=x).last_hidden_state[:, 0] - encoder(x)).abs().max() < 1e-5
    proc = run_cli("export", "--run", str(tmp_path / "runs" / "resnet"), "--format", "hf")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.norm=batch" in lines[0], proc.stderr


def test_init_from_our_export_and_from_a_vit_model(vit_clip, tmp_path, digits_dir):
    """export:DIR gives an image-text run every tower of the export; hf:DIR of a ViTModel the
    image encoder of a vision run (momentum copies synced to it)."""
    from dist_contrast.config import load_config
    from dist_contrast.train.setup import initial_method

    tmp, run = vit_clip
    assert run_cli("export", "--run", str(run), "--out", str(tmp_path / "exp")).returncode == 0
    cfg, step_dir = load_run(run)
    cfg.model.init_from = f"export:{tmp_path / 'exp'}"
    cfg.run.dir = str(tmp_path / "runs")
    started, trained = initial_method(cfg), trained_method(*load_run(run))
    want = {k: v for k, v in trained.state_dict().items() if not k.startswith("queues.")}
    assert all(torch.equal(started.state_dict()[k], v) for k, v in want.items())

    vit_cfg = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4)
    vit_cfg.update(num_attention_heads=4, image_size=16, patch_size=4, num_channels=1)
    vit_cfg.update(layer_norm_eps=1e-6)
    hf_vit = transformers.ViTModel(transformers.ViTConfig(**vit_cfg), add_pooling_layer=False)
    hf_vit.eval().save_pretrained(tmp_path / "vit")
    moco = load_config(
        ROOT / "configs/moco_v3_digits.yaml",
        [
            "model.encoder=vit_nano",
            f"model.init_from=hf:{tmp_path / 'vit'}",
            f"data.train_shards={digits_dir}/train-*.tar",
            f"run.dir={tmp_path / 'runs'}",
        ],
    )
    method = initial_method(moco).eval()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf_vit(pixel_values=x).last_hidden_state[:, 0]
        assert (method.encoder(x) - want).abs().max() < 1e-5
        assert (method.target_encoder(x) - want).abs().max() < 1e-5
