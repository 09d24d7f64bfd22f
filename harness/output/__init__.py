"""Turning measurements into things a person reads: tables (statistics, Markdown, LaTeX,
CSV), their layouts, figures, report.html, and reading saved run folders back."""
