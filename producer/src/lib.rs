//! deltasync producer library (commands arrive with their issues).
