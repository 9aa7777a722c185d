"""Problems and how they are judged and summarised: data sets, answer parsing, verifiers, the code
sandbox, metrics, paired statistics and run reports."""
