"""serve/"""
