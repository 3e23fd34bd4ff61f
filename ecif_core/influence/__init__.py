"""influence"""
