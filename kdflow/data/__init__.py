"""Stage 1, data: download and verify archives, parse CIFAR and image folders into arrays, split and subset them."""
