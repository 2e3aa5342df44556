"""hashmesh cli."""
