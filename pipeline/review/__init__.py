"""Review: the spreadsheet people correct, and the corrections store their verdicts go to."""
