"""sparsecc"""
