"""Generate the synthetic shapes data set (COCO format, with masks) that `make run` trains on.

The data set is castling_det.data.make_shapes_dataset's.

Usage: python tools/make_shapes_dataset.py --output datasets/shapes [--num-train 300 --num-val 60]
"""
import argparse

from castling_det.data import make_shapes_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory to write the data set into")
    parser.add_argument("--num-train", type=int, default=300)
    parser.add_argument("--num-val", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    splits = make_shapes_dataset(
        args.output, num_train=args.num_train, num_val=args.num_val,
        image_size=args.image_size, seed=args.seed,
    )
    for split, (json_path, image_dir) in splits.items():
        print(f"{split}: {json_path} ({image_dir})")


def run():
    """Console entry point (`castling-make-shapes-dataset`)."""
    main()


if __name__ == "__main__":
    run()
