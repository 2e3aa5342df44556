"""hashmesh balancer."""
