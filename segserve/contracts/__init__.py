"""What the stages agree on, written once and free of torch: the model card, the model
repository's layout, the class palette and the architectures' names and strides.

training/, export/ and service/ import these; none of them restates them."""
