"""Zero-shot top-1 of a `dist-contrast export --format hf` image-text folder (a CLIPModel or a
SiglipModel), with transformers only.

No dist_contrast import: the folder is read by `AutoModel`, `AutoTokenizer` and
`AutoImageProcessor`, the shards by `tarfile` and PIL. Each class's text embedding is the
normalised mean of the normalised embeddings of its prompts (one per template), an image gets
the class of highest cosine similarity: the procedure `dist-contrast eval` reports as
`zeroshot_top1`.

    python examples/hf_zero_shot.py --model runs/NAME/hf --shards 'data/digits/val-*.tar'

Prints one JSON object: {"zeroshot_top1": ..., "samples": ...}. The defaults of --classes and
--templates are the digits' class names and the templates held out from their captions.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import tarfile
from collections import defaultdict

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

DIGITS = "zero,one,two,three,four,five,six,seven,eight,nine"
TEMPLATES = (
    "a drawing of the number {}|an image of a {}|a low resolution {}|"
    "handwriting showing the digit {}"
)
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def read_shards(pattern: str) -> tuple[list[Image.Image], list[int]]:
    """Images and `cls` labels of every sample of the shards, in shard order."""
    images, labels = [], []
    for path in sorted(glob.glob(pattern)):
        samples: dict[str, dict[str, bytes]] = defaultdict(dict)
        order: list[str] = []
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if key not in samples:
                    order.append(key)
                samples[key][ext] = tar.extractfile(member).read()
        for key in order:
            fields = samples[key]
            image = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
            if image is None or "cls" not in fields:
                continue
            images.append(Image.open(io.BytesIO(image)))
            labels.append(int(fields["cls"].decode()))
    if not images:
        raise SystemExit(f"no labelled images in '{pattern}'")
    return images, labels


@torch.no_grad()
def zero_shot(model_dir: str, pattern: str, classes: list[str], templates: list[str]) -> dict:
    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    prompts = [t.format(c) for c in classes for t in templates]
    tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
    text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=1)
    class_emb = F.normalize(text.view(len(classes), len(templates), -1).mean(dim=1), dim=1)
    images, labels = read_shards(pattern)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    feats = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=1)
    pred = (feats @ class_emb.T).argmax(dim=1)
    correct = (pred == torch.tensor(labels)).double().mean()
    return {"zeroshot_top1": float(correct), "samples": len(labels)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="folder from dist-contrast export --format hf")
    p.add_argument("--shards", required=True, help="glob of labelled WebDataset shards")
    p.add_argument("--classes", default=DIGITS, help="class names, comma-separated, by label")
    p.add_argument("--templates", default=TEMPLATES, help="prompt templates, '|'-separated")
    args = p.parse_args()
    result = zero_shot(args.model, args.shards, args.classes.split(","), args.templates.split("|"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
