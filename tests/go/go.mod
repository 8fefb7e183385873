module echtest

go 1.27
