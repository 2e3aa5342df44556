"""Generated code for the hashmesh.v1 contract (see the .proto files beside this one)."""
