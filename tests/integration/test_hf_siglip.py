"""SigLIP's layouts through Hugging Face ``transformers`` (the real library, a test extra): a
SigLIP run exported as ``SiglipModel`` whose features and logits (scale and bias), computed in
a process without dist_contrast, equal ours; its zero-shot by the transformers-only script; a
random ``SiglipModel`` as ``model.init_from``; ``SiglipVisionModel`` both ways; the layout mixes
and ``--format open_clip`` refused in one line. Helpers: test_hf.py."""

from __future__ import annotations

import pytest
import torch
from test_hf import (
    CAPTIONS,
    VIT_SIZE,
    check_zero_shot_script,
    exported_short_run,
    without_dist_contrast,
)

from dist_contrast.data.tokenizer import BPETokenizer
from dist_contrast.export import load_clip
from dist_contrast.export.write import trained_method
from dist_contrast.train.runs import load_run

from conftest import ROOT, run_cli

transformers = pytest.importorskip("transformers")

SIGLIP_CONTEXT = 12  # configs/siglip_vit_digits.yaml
SIGLIP_SIZE = [*VIT_SIZE, "model.proj_dim=96"]  # SigLIP's pooled image feature is the joint space
TRANSFORMERS_SIGLIP = """
import sys, torch
from transformers import AutoModel, AutoTokenizer
folder, inputs, out = sys.argv[1:4]
model = AutoModel.from_pretrained(folder).eval()
captions = open(inputs + ".txt").read().split("\\n")
tokens = AutoTokenizer.from_pretrained(folder)(
    captions, padding="max_length", truncation=True, return_tensors="pt"
)
with torch.no_grad():
    got = model(pixel_values=torch.load(inputs + ".pt", weights_only=True), **tokens)
features = {"image": got.vision_model_output, "text": got.text_model_output}
torch.save({"class": type(model).__name__, "keys": sorted(tokens), "ids": tokens["input_ids"],
            **{k: v.pooler_output for k, v in features.items()}, "logits": got.logits_per_image},
           out)
"""


@pytest.fixture(scope="module")
def vit_siglip(tmp_path_factory, digits_dir, digits_tokenizer):
    """A 4-step SigLIP run in SigLIP's layouts (configs/siglip_vit_digits.yaml, the ViT resized
    as vit_clip's), evaluated and exported with --format hf."""
    tmp = tmp_path_factory.mktemp("vit_siglip")
    return exported_short_run(
        tmp,
        "configs/siglip_vit_digits.yaml",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
        f"data.tokenizer_path={digits_tokenizer}",
        *SIGLIP_SIZE,
        name="siglip",
    )


def test_siglip_export_gives_transformers_only_logits_equal_to_ours(vit_siglip, digits_tokenizer):
    """A process that cannot import dist_contrast loads the export with AutoModel and
    AutoTokenizer: a SiglipModel whose features and logits (scale and bias) equal ours."""
    tmp, run = vit_siglip
    pixels = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    torch.save(pixels, tmp / "inputs.pt")
    (tmp / "inputs.txt").write_text("\n".join(CAPTIONS))
    script = tmp / "siglip_logits.py"
    script.write_text(TRANSFORMERS_SIGLIP)
    proc = without_dist_contrast(script, tmp / "hf", tmp / "inputs", tmp / "got.pt", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp / "got.pt", weights_only=True)
    assert got["class"] == "SiglipModel" and got["keys"] == ["input_ids"]  # no padding mask
    tok = BPETokenizer.load(digits_tokenizer, SIGLIP_CONTEXT)
    assert torch.equal(got["ids"], tok(CAPTIONS))
    cfg, step_dir = load_run(run)
    method = trained_method(cfg, step_dir).eval()
    with torch.no_grad():
        image, text = method.image(pixels), method.text(tok(CAPTIONS))
        c = method.criterion
        cos = (
            torch.nn.functional.normalize(image, dim=1)
            @ torch.nn.functional.normalize(text, dim=1).T
        )
        logits = cos * c.logit_scale.exp() + c.logit_bias
    bias = float(c.logit_bias.detach())
    assert bias == pytest.approx(-10, abs=0.5) and bias != -10  # trained: it moved
    assert (got["image"] - image).abs().max() < 1e-5
    assert (got["text"] - text).abs().max() < 1e-5
    assert (got["logits"] - logits).abs().max() < 1e-5
    card = (tmp / "hf" / "README.md").read_text()
    assert "SiglipModel.from_pretrained" in card and "siglip layout, width 64" in card
    proc = run_cli("export", "--run", str(run), "--out", str(tmp / "native"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    native = load_clip(tmp / "native")  # the native load carries the bias too
    assert (native.logit_scale, native.logit_bias) == (float(c.scale().detach()), bias)


def _tiny_siglip_config(tok: BPETokenizer) -> transformers.SiglipConfig:
    """A SiglipModel of transformers' own defaults (gelu_pytorch_tanh, eps 1e-6) at the sizes
    of configs/siglip_vit_digits.yaml."""
    text = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=256)
    text.update(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=SIGLIP_CONTEXT)
    text.update(pad_token_id=tok.pad_id, bos_token_id=tok.sot_id, eos_token_id=tok.eot_id)
    text.update(projection_size=128)
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4)
    vision.update(num_attention_heads=4, image_size=16, patch_size=4, num_channels=1)
    return transformers.SiglipConfig(text_config=text, vision_config=vision)


def test_init_from_hf_siglip_and_its_refusals(tmp_path, digits_dir, digits_tokenizer):
    """A random SiglipModel made by transformers starts a SigLIP-layout run: features, scale
    and bias equal; CLIP's text layout, or CLIP's image layout, is refused in one line."""
    from dist_contrast.config import load_config
    from dist_contrast.errors import UserError
    from dist_contrast.train.setup import initial_method

    tok = BPETokenizer.load(digits_tokenizer, SIGLIP_CONTEXT)
    torch.manual_seed(4)
    hf_model = transformers.SiglipModel(_tiny_siglip_config(tok)).eval()
    with torch.no_grad():
        hf_model.logit_scale.fill_(2.5)
        hf_model.logit_bias.fill_(-7.0)
    hf_model.save_pretrained(tmp_path / "hf_init")
    base = [
        f"model.init_from=hf:{tmp_path / 'hf_init'}",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.tokenizer_path={digits_tokenizer}",
        f"run.dir={tmp_path}",
    ]
    cfg = load_config(ROOT / "configs/siglip_vit_digits.yaml", base)
    method = initial_method(cfg).eval()
    pixels = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    ids = tok(CAPTIONS)
    with torch.no_grad():
        want = hf_model(pixel_values=pixels, input_ids=ids)
        image, text = method.image(pixels), method.text(ids)
    assert (image - want.vision_model_output.pooler_output).abs().max() < 1e-5
    assert (text - want.text_model_output.pooler_output).abs().max() < 1e-5
    assert float(method.criterion.logit_scale.detach()) == 2.5
    assert float(method.criterion.logit_bias.detach()) == -7.0
    for override, match in (
        ("text.layout=clip", "holds a text tower in the siglip layout: set text.layout=siglip"),
        ("model.vit_layout=clip", "holds a ViT in the siglip layout: .*model.vit_layout=siglip"),
        ("model.activation=gelu", "hidden_act is 'gelu_pytorch_tanh', .*activation=gelu_tanh"),
    ):
        extra = ["model.proj_dim=64"] if "vit_layout" in override else []
        cfg = load_config(ROOT / "configs/siglip_vit_digits.yaml", [*base, override, *extra])
        with pytest.raises(UserError, match=match):
            initial_method(cfg)


def test_siglip_vision_export_and_mixed_layouts_refused(tmp_path, digits_dir, digits_tokenizer):
    """A vision run's siglip-layout ViT exports as a SiglipVisionModel (read back by
    model.init_from too); an image-text run mixing the layouts is refused in one line."""
    from dist_contrast.config import load_config
    from dist_contrast.export.hf import write_hf
    from dist_contrast.export.layout import ExportError
    from dist_contrast.methods import build_method
    from dist_contrast.train.setup import initial_method

    data = [f"data.train_shards={digits_dir}/train-*.tar", f"run.dir={tmp_path}"]
    vision = ["model.encoder=vit_nano", "model.vit_layout=siglip", *data]
    cfg = load_config(ROOT / "configs/simclr_digits.yaml", vision)
    torch.manual_seed(8)
    method = build_method(cfg).eval()
    (tmp_path / "vis").mkdir()
    assert write_hf(method, cfg, tmp_path / "vis") == "SiglipVisionModel"
    model = transformers.SiglipVisionModel.from_pretrained(tmp_path / "vis").eval()
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (model(pixel_values=x).pooler_output - method.encoder(x)).abs().max() < 1e-5
    cfg.model.init_from = f"hf:{tmp_path / 'vis'}"
    started = initial_method(cfg).eval()
    with torch.no_grad():
        assert torch.equal(started.encoder(x), method.encoder(x))

    mixed = [f"data.tokenizer_path={digits_tokenizer}", *data, "text.layout=clip"]
    cfg = load_config(ROOT / "configs/siglip_vit_digits.yaml", mixed)
    (tmp_path / "mixed").mkdir()
    with pytest.raises(ExportError, match="a siglip image tower with the clip text tower"):
        write_hf(build_method(cfg), cfg, tmp_path / "mixed")


def test_transformers_only_script_reproduces_the_siglip_zero_shot(vit_siglip, digits_dir):
    check_zero_shot_script(*vit_siglip, digits_dir)


def test_siglip_layouts_to_open_clip_are_refused_in_one_line(vit_siglip):
    """open_clip holds SigLIP's image tower in timm, not in its own CLIP: one line, exit 2."""
    tmp, run = vit_siglip
    proc = run_cli("export", "--run", str(run), "--out", str(tmp / "oc"), "--format", "open_clip")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "(siglip layout) has no open_clip layout" in lines[0] and not (tmp / "oc").exists()
