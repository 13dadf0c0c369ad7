"""Experiments of the papers (Section 4): caption metrics, object hallucination, and (later) ablation,
correctness, masking and fine-tuning."""
