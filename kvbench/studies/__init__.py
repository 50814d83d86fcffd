"""Studies built on the harness: paper recipes (recipes.py), and more beside them."""
