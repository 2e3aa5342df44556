"""hashmesh hashd."""
