"""`python -m search [--config FILE] [key=value ...]`"""

from retrieval.cli import parse_stage_args, stage_parser
from retrieval.errors import cli_entry
from search.pipeline import search_collection


@cli_entry
def main(argv=None):
    parser = stage_parser(
        "search",
        "Search the encoded queries of every eval split against the passage embeddings of each size "
        "(exact by default, or any FAISS index_factory string in search.index) and write TREC run files.",
    )
    cfg, _ = parse_stage_args(parser, argv)
    search_collection(cfg)


if __name__ == "__main__":
    main()
