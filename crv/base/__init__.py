"""The base every layer may use: errors (temporary or permanent), CRV_HOME and its files, file
locks, the retry policy, and what `crv up` left running."""
