"""Tools run from the repository root, not part of the installed package: the shell scripts that set
up, test and demo the project, and (``scripts.toy``) the toy world's training and evaluation scripts."""
