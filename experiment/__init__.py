"""`python -m experiment`: the paper's comparison (zero-shot, full, separate, 2DMSE, SRL, SRL w/o KL,
SMAE+SRL) as one pipeline of the four stages, and its report (docs/results.md)."""
