"""Request → engine → response: the OpenAI semantics that need the model (`chat.ChatService`)."""
