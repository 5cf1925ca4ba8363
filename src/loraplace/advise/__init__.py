"""Ranking modules by a cheap score before training, and checking that ranking with a study."""
