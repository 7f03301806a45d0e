"""One module per figure/table of the LAPQ paper reproduction."""
