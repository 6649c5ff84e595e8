"""`python -m train`: fine-tune a Starbucks retriever (srl | 2dmse | separate | full).

- `train.finetune.run_training(cfg)`: the stage's function (checks, model, loss, data);
- `train.trainer.fit(task, settings, run_dir, model_dir)`: the shared accelerate loop, with
  checkpoints and resume, that any `TrainTask` (fine-tuning, SMAE pre-training) plugs into;
- `train.methods`: which sizes each method visits; `train.data`: groups, order, collation.
"""
