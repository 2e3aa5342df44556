"""hashmesh workerd."""
