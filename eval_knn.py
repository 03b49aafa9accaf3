"""Weighted k-NN evaluation of a frozen backbone (DINO protocol).

    python eval_knn.py --pretrained_weights output/checkpoint.pth --data_path fashion-mnist
    torchrun --nproc_per_node 8 eval_knn.py --pretrained_weights dino_deitsmall16_pretrain.pth --data_path /imagenet

Features are the backbone's pooled vectors (SimPool, or the [CLS] token in official
mode; for convnets -- resnet50, convnext_*, fcvit_* -- SimPool or their own global average
pooling over the last feature map, on images of 32 px or more; ``--avgpool_patchtokens`` and
``--n_last_blocks`` as in DINO's and iBOT's scripts), L2-normalised; each test
image takes the k nearest training images by cosine similarity (exact faiss inner-product
search, on GPU when faiss-gpu and CUDA exist; ``--knn_backend torch`` for the faster exact
search of simpool/knn.py) and each neighbour votes for its class with
weight exp(similarity / T). Prints top-1/top-5 for every k and writes ``knn.json`` in
--output_dir (in --output_dir/KEY for each key of ``--checkpoint_key teacher,student``).
"""

import argparse
import logging
import os
import time

import torch

from simpool import utils
from simpool.checkpoints import add_model_args, load_pretrained
from simpool.evaluation import (
    EvalError,
    FrozenFeatures,
    add_data_args,
    add_feature_args,
    add_precision_arg,
    add_window_size_arg,
    build_eval_splits,
    drop_unreadable,
    evaluate_each_key,
    is_in_memory,
    log_feature_choice,
    resolve_eval_precision,
    run_main,
    tolerant_collate,
)
from simpool.knn import extract_features, knn_classify
from simpool.utils import number

logger = logging.getLogger("simpool")


def get_args_parser():
    p = argparse.ArgumentParser(
        prog="eval_knn.py",
        description="Weighted k-NN evaluation on frozen features (DINO protocol)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_window_size_arg(add_model_args(p, several_keys=True))
    add_feature_args(p, n_last_blocks=1)
    g = add_data_args(p)
    g.add_argument(
        "--batch_size_per_gpu", default=256, type=number(int, low=1), help="Images per process per forward pass."
    )
    g.add_argument(
        "--num_workers",
        default=4,
        type=number(int, low=0),
        help="Data-loading processes per rank (ImageFolder only; the built-in Fashion-MNIST is served from memory).",
    )
    g = p.add_argument_group("k-NN")
    g.add_argument(
        "--nb_knn",
        default=[10, 20, 100, 200],
        type=number(int, low=1),
        nargs="+",
        help="Numbers of nearest neighbours to evaluate (values above the training-set size are clipped to it).",
    )
    g.add_argument(
        "--temperature",
        default=0.07,
        type=number(float, above=0),
        help="Temperature T of the vote weights exp(similarity / T).",
    )
    g.add_argument(
        "--knn_backend",
        default="faiss",
        choices=["faiss", "torch"],
        help="Exact nearest-neighbour "
        "search: 'faiss' (fp32 inner-product index, on GPU with faiss-gpu and CUDA) or 'torch' (bf16 "
        "candidate search proved exact per query, then fp32 rescoring; faster on CPUs with bf16 instructions, see "
        "bench/knn.py). Both give the same neighbours.",
    )
    g.add_argument(
        "--use_cuda",
        default=True,
        type=utils.bool_flag,
        help="Run the k-NN search with the features "
        "on the GPU when there is one (DINO's flag); False keeps them in host memory, for sets that do not "
        "fit on the GPU (features are still extracted on it). No effect on CPU.",
    )
    g.add_argument(
        "--dump_features",
        default=None,
        type=str,
        help="Save the extracted features and labels "
        "(trainfeat.pth, testfeat.pth, trainlabels.pth, testlabels.pth) in this folder.",
    )
    g.add_argument(
        "--load_features",
        default=None,
        type=str,
        help="Load features saved by --dump_features from this folder instead of running the backbone.",
    )
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=".", type=str, help="Where knn.json is written.")
    add_precision_arg(g)
    g.add_argument("--cpu", action="store_true", help="Run on CPU even when CUDA is available.")
    utils.add_launch_args(g)
    return p


FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


def compute_features(args):
    """(train_feats, train_labels, test_feats, test_labels, classes, info) from the backbone."""
    model, info = load_pretrained(
        args.pretrained_weights,
        args.checkpoint_key,
        args.arch,
        args.patch_size,
        args.mode,
        args.gamma,
        image_size=args.image_size,
        resample_native_pos=args.resample_native_pos,
    )
    image_size = info["image_size"]
    model = FrozenFeatures(model, args.n_last_blocks, args.avgpool_patchtokens).to(args.device).eval()
    log_feature_choice(model, info, args)
    info["features"] = {"dim": model.dim, **model.settings()}
    train, val = build_eval_splits(
        args.data_path, image_size, args.subset, args.val_subset, subset_start=args.subset_starts
    )
    logger.info(
        f"Data: {len(train)} training and {len(val)} evaluation images from {args.data_path}, "
        f"{len(train.classes)} classes, at {image_size}px."
    )
    kw = dict(
        batch_size=args.batch_size_per_gpu,
        device=args.device,
        image_size=image_size,
        amp_dtype=resolve_eval_precision(args, args.device),
    )
    if not is_in_memory(train):
        kw.update(num_workers=args.num_workers, collate=tolerant_collate(image_size))
    train_f, train_y = drop_unreadable(*extract_features(model, train, header="Train features", **kw))
    test_f, test_y = drop_unreadable(*extract_features(model, val, header="Test features", **kw))
    return train_f, train_y, test_f, test_y, list(train.classes), info


def load_features(folder):
    paths = [os.path.join(folder, name) for name in FEATURE_FILES]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise EvalError(f"--load_features {folder}: missing {', '.join(os.path.basename(p) for p in missing)}")
    tensors = [utils.load_checkpoint(p) for p in paths]
    if not all(torch.is_tensor(t) for t in tensors):
        raise EvalError(f"--load_features {folder}: the files do not hold tensors")
    train_f, test_f, train_y, test_y = tensors
    if (
        train_f.ndim != 2
        or test_f.ndim != 2
        or train_f.shape[1] != test_f.shape[1]
        or len(train_f) != len(train_y)
        or len(test_f) != len(test_y)
    ):
        raise EvalError(
            f"--load_features {folder}: inconsistent shapes (train {list(train_f.shape)}, "
            f"test {list(test_f.shape)}, labels {len(train_y)}/{len(test_y)})"
        )
    return train_f, train_y.long(), test_f, test_y.long()


def format_table(results):
    lines = ["    k   top-1   top-5", "-----  ------  ------"]
    lines += [f"{k:5d}  {r['top1']:6.2f}  {r['top5']:6.2f}" for k, r in sorted(results.items())]
    return "\n".join(lines)


def eval_knn(args):
    utils.ensure_writable_dir(args.output_dir)  # before any feature is computed
    if args.dump_features:
        utils.ensure_writable_dir(args.dump_features)
    utils.init_distributed_mode(args)
    start = time.time()
    info, classes = {}, None
    if args.load_features:
        train_f, train_y, test_f, test_y = load_features(args.load_features)
        logger.info(
            f"Loaded features from {args.load_features}: train {list(train_f.shape)}, test {list(test_f.shape)}."
        )
    else:
        train_f, train_y, test_f, test_y, classes, info = compute_features(args)
    if not utils.is_main_process():
        return None
    if args.dump_features:
        os.makedirs(args.dump_features, exist_ok=True)
        for name, t in zip(FEATURE_FILES, (train_f, test_f, train_y, test_y)):
            utils.save_checkpoint(t.contiguous(), os.path.join(args.dump_features, name))
        logger.info(f"Features saved in {args.dump_features}.")
    if len(train_f) == 0 or len(test_f) == 0:
        raise EvalError("no features to evaluate (empty training or evaluation set)")
    num_classes = len(classes) if classes else int(max(train_y.max(), test_y.max())) + 1
    ks = sorted(set(args.nb_knn))
    if ks[-1] > len(train_f):
        logger.warning(f"k > {len(train_f)} training images: those k are clipped to {len(train_f)}.")
    features_done = time.time()
    results = knn_classify(
        train_f,
        train_y,
        test_f,
        test_y,
        ks=ks,
        temperature=args.temperature,
        num_classes=num_classes,
        use_gpu=args.device.type == "cuda" and args.use_cuda,
        backend=args.knn_backend,
    )
    knn_seconds = time.time() - features_done
    print(f"Weighted k-NN (T={args.temperature}) on {len(test_f)} images, {len(train_f)} neighbours to choose from:")
    print(format_table(results))
    print(f"Time: features {features_done - start:.1f} s, k-NN search and vote {knn_seconds:.1f} s.")
    record = {
        "results": {str(k): r for k, r in sorted(results.items())},
        "best": dict(zip(("k", "top1"), max(((k, r["top1"]) for k, r in results.items()), key=lambda t: t[1]))),
        "temperature": args.temperature,
        "n_train": len(train_f),
        "n_test": len(test_f),
        "data_path": args.data_path,
        "subset": args.subset,
        "subset_starts": args.subset_starts,
        "val_subset": args.val_subset,
        "pretrained_weights": args.pretrained_weights or None,
        "checkpoint_key": args.checkpoint_key,
        "model": {k: info.get(k) for k in ("arch", "patch_size", "mode", "gamma", "image_size", "epoch")},
        "features": info.get("features"),
        "seconds": round(time.time() - start, 1),
        "feature_seconds": round(features_done - start, 1),
        "knn_seconds": round(knn_seconds, 2),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "knn.json")
    utils.write_json(path, record)
    logger.info(f"Wrote {path}.")
    return results


def best_result(results):
    k, r = max(results.items(), key=lambda item: item[1]["top1"])
    return f"top-1 {r['top1']:.2f}% (k={k})"


def eval_knn_each_key(args):
    return evaluate_each_key(
        eval_knn, args, folders=("output_dir", "dump_features"), one_key_flags=("load_features",), summary=best_result
    )


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    return run_main(eval_knn_each_key, args)


if __name__ == "__main__":
    main()
