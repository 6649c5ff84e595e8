"""`python -m train --config FILE [key=value ...]`: fine-tune (or, with train.method=smae, pre-train)."""

from __future__ import annotations

from retrieval.cli import parse_stage_args, stage_parser
from retrieval.errors import cli_entry


@cli_entry
def main(argv=None) -> None:
    parser = stage_parser(
        "train",
        "Fine-tune a Starbucks retriever (train.method: srl | 2dmse | separate | full), "
        "or SMAE-pre-train one (train.method: smae); re-run the same command to resume.",
    )
    cfg, _ = parse_stage_args(parser, argv)
    if cfg.train.method == "smae":
        from train.pretrain import run_pretraining

        run_pretraining(cfg)
    else:
        from train.finetune import run_training

        run_training(cfg)


if __name__ == "__main__":
    main()
