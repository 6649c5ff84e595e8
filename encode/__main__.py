"""`python -m encode [--config FILE] [--shard i/n] [key=value ...]`"""

from encode.pipeline import encode_collection
from retrieval.cli import parse_stage_args, stage_parser
from retrieval.errors import cli_entry


@cli_entry
def main(argv=None):
    parser = stage_parser(
        "encode",
        "Encode the corpus and the eval queries into per-size float16 embedding shards "
        "(every configured size in one pass, or encode.sizes=grande / 8x256). Resumable; "
        "several workers share the corpus with --shard i/n or torchrun.",
    )
    parser.add_argument("--shard", metavar="I/N", help="encode slice I of N (0-based); same as encode.shard=I/N")
    cfg, args = parse_stage_args(parser, argv)
    if args.shard:
        cfg.encode.shard = args.shard
    encode_collection(cfg)


if __name__ == "__main__":
    main()
