"""Evaluation on labelled data: metrics, tables, plots."""
