"""Responsible recommendations: what a model does per user group and to the catalogue.

- :mod:`common.fairness.metrics`: per-user-group accuracy with bootstrap intervals, exposure
  (coverage, Gini, popularity, long tail), genre diversity and miscalibration (Steck 2018);
- :mod:`common.fairness.rerank`: diversity (MMR) and calibrated re-ranking of one user's list;
- :mod:`common.fairness.attacker`: how well a protected attribute can be recovered from the
  latent code (an attacker's AUC).
"""
