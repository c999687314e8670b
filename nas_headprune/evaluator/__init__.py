"""Evaluation: cost (analytic MACs), measure (independent count), materialize, fine-tune, metrics."""
