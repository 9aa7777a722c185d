"""Test-time adaptation: the Weights stream (ROSA step, hidden offset), the Words stream (critique and
rewrite), the text models that serve it, and the leakage guard."""
