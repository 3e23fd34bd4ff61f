"""The service layer: command line now; API, database and workers build on ecif_core here."""
