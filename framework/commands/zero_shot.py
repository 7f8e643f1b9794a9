"""`pretrain zero-shot`: how well a CLIP classifies images it was never trained to classify, and how well it retrieves.

    pretrain zero-shot --ckpt runs/clip-smoke/checkpoints/last.ckpt --data data/shapes

Each class name is put into every prompt template ("a photo of a {}."), the prompts are encoded by the text tower and
averaged per class (Radford et al. 2021, section 3.1.4); an image's class is the one whose embedding is closest to its
own. Reads the val split of image shards (`pretrain prepare-images`); with captions, also image->text and text->image
recall@1/5/10 over the split.
"""

from __future__ import annotations

import argparse

import torch

from framework.checkpoint.reader import checkpoint_meta
from framework.checkpoint.formats import trust_checkpoint
from framework.checkpoint.load import load_model
from framework.commands.common import add_model_arguments
from framework.data.images import ImageDataModule
from framework.errors import UserError
from framework.inference import DEFAULT_TEMPLATES, check_templates, evaluate


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="pretrain zero-shot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "a CLIP")
    p.add_argument("--data", required=True, help="image shards written by `pretrain prepare-images` (its val split)")
    p.add_argument("--template", action="append", dest="templates",
                   help="a prompt with {} for the class name (repeat for an ensemble; default: the templates the "
                        "checkpoint was validated with, else 'a {}.', 'a photo of a {}.', 'a picture of a {}.')")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    trust_checkpoint(args.trust_checkpoint)
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    model, tok = load_model(args.ckpt, args.model, args.tokenizer, model_type="clip")
    templates = args.templates
    if templates is None and args.ckpt is not None:
        templates = checkpoint_meta(args.ckpt).get("hyper_parameters", {}).get("zero_shot_templates")
    templates = check_templates(list(templates or DEFAULT_TEMPLATES), "--template")
    image = model.config.image
    dm = ImageDataModule(path=args.data, image_size=int(image.get("image_size", 224)), batch_size=args.batch_size,
                         num_workers=0, captions=True, max_caption_tokens=model.config.text["seq_len"] - 2)
    dm.setup("validate")
    names = dm.class_names if dm.has_labels else []
    model.to(args.device)
    results = evaluate(model, tok, dm.val_dataloader(), names, templates, args.device)
    print(f"{int(results.pop('images')):,} val images of '{args.data}', {len(templates)} prompt template(s)")
    if "zero_shot_top1" in results:
        chance = results.pop("chance")
        print(f"zero-shot top-1: {results['zero_shot_top1']:.2%}   top-5: {results.get('zero_shot_top5', 0):.2%}   "
              f"over {len(names)} classes (chance {chance:.2%}, top-1 is {results['zero_shot_top1'] / chance:.1f}x)")
    else:
        print("zero-shot: the val images carry no classes (prepare them with a folder per class)")
    recalls = {k: v for k, v in results.items() if "R@" in k}
    if recalls:
        print("retrieval: " + "   ".join(f"{k} {v:.2%}" for k, v in recalls.items()))
