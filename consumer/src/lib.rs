//! deltasync consumer library (commands arrive with their issues).
