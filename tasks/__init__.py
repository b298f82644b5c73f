"""Stage logic of the CIFAR-10 pipeline; knows nothing of Prefect."""
