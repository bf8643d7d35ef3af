"""Orchestration: CLI, runner (one subprocess per backend run), results, tables, report.

Never imports torch or tensorflow in the parent process.
"""
