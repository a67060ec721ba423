"""How good a model is: exams, operating points and intervals, metrics, plots and the HTML report pages."""
