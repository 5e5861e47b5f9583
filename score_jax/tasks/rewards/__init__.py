"""Reward machinery the tasks use: a bounded verifier pool, the MATH grader, the code sandbox.

Only tasks import these; the trainer sees rewards through `Task.rewards`.
"""
