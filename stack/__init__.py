"""Whole-system glue: the local launcher (make up), the offline demo and model bootstrap."""
